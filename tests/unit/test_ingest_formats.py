"""Text, Markdown, HTML and BEIR JSONL → structural blocks."""

from __future__ import annotations

import json

import pytest

from stratamesh.events import ContentType
from stratamesh.services.ingest.formats import (
    Block,
    FormatError,
    blocks_hash,
    normalise,
    parse,
    parse_beir_jsonl,
    parse_html,
    parse_markdown,
    parse_text,
)


def kinds(blocks: list[Block]) -> list[tuple[str, str]]:
    return [(b.kind, b.text) for b in blocks]


def test_markdown_blocks_headings_lists_tables_code_and_front_matter() -> None:
    src = (
        "---\ntitle: 'Install guide'\nowner: ops\n---\n"
        "# Guide\n\nIntro with **bold**, a [link](http://x.test) and `code`.\nWrapped line.\n\n"
        "## Steps\n\n- first\n  continued\n- second\n  1. nested\n\n"
        "| a | b |\n|---|---|\n| 1 | x\\|y |\n\n"
        "```bash\napt install strata\n\nstrata up\n```\n\n"
        "> quoted text\n\n"
        "<div><p>raw html</p></div>\n\n"
        "Setext heading\n--------------\nbody\n"
    )
    parsed = parse_markdown(src)
    assert parsed.title == "Install guide"  # front matter wins over the first heading
    assert kinds(parsed.blocks) == [
        ("heading", "Guide"),
        ("paragraph", "Intro with bold, a link and `code`. Wrapped line."),
        ("heading", "Steps"),
        ("list_item", "- first continued"),
        ("list_item", "- second"),
        ("list_item", "  1. nested"),
        ("table", "| a | b |\n| --- | --- |\n| 1 | x\\|y |"),
        ("code", "```bash\napt install strata\n\nstrata up\n```"),
        ("quote", "quoted text"),
        ("paragraph", "raw html"),
        ("heading", "Setext heading"),
        ("paragraph", "body"),
    ]
    levels = [b.level for b in parsed.blocks if b.kind == "heading"]
    assert levels == [1, 2, 2]
    table = parsed.blocks[6]
    assert table.header == 2 and len(table.lines) == 3
    code = parsed.blocks[7]
    assert code.prefix == "```bash" and code.lines == ("apt install strata", "", "strata up")


def test_markdown_title_falls_back_to_the_first_h1() -> None:
    assert parse_markdown("intro\n\n# Real title\n\n## Sub\n").title == "Real title"
    assert parse_markdown("just text").title == ""


def test_html_blocks_title_lists_tables_pre_and_dropped_elements() -> None:
    html = """<!doctype html><html><head><title>Page &amp; title</title>
    <style>.x { color: red }</style><script>var a = "<p>no</p>";</script></head>
    <body><h1>Main</h1><p>Hello <b>world</b>.<br>Second&nbsp;line</p>
    <ul><li>one</li><li>two<ul><li>inner</li></ul></li></ul>
    <ol start="3"><li>three</li><li>four</li></ol>
    <table><tr><th>k</th><th>v</th></tr><tr><td>a</td><td>1</td></tr></table>
    <pre><code class="language-python">x = 1
    if x:
        print(x)</code></pre>
    <blockquote>wise words</blockquote><noscript>enable js</noscript>
    <h2>Tail</h2>trailing text</body></html>"""
    parsed = parse_html(html)
    assert parsed.title == "Page & title"
    assert kinds(parsed.blocks) == [
        ("heading", "Main"),
        ("paragraph", "Hello world. Second line"),
        ("list_item", "- one"),
        ("list_item", "- two"),
        ("list_item", "  - inner"),
        ("list_item", "3. three"),
        ("list_item", "4. four"),
        ("table", "| k | v |\n| --- | --- |\n| a | 1 |"),
        ("code", "```python\nx = 1\n    if x:\n        print(x)\n```"),
        ("quote", "wise words"),
        ("heading", "Tail"),
        ("paragraph", "trailing text"),
    ]


def test_html_without_text_has_no_blocks_and_broken_markup_is_tolerated() -> None:
    assert parse_html("<html><script>x()</script><style>p{}</style></html>").blocks == []
    parsed = parse_html("<p>unclosed <b>bold <i>and <p>next")
    assert [b.text for b in parsed.blocks] == ["unclosed bold and", "next"]


def test_plain_text_paragraphs_and_bullets() -> None:
    parsed = parse_text("First para\nwrapped here.\n\n- a\n- b\n  continued\n2) c\n\n\nLast.")
    assert kinds(parsed.blocks) == [
        ("paragraph", "First para wrapped here."),
        ("list_item", "- a"),
        ("list_item", "- b continued"),
        ("list_item", "2) c"),
        ("paragraph", "Last."),
    ]


def test_beir_jsonl_one_record_and_many() -> None:
    one = json.dumps({"_id": "4983", "title": "Brain MRI", "text": "Para one.\n\nPara two."})
    parsed = parse_beir_jsonl(one)
    assert parsed.title == "Brain MRI"
    assert kinds(parsed.blocks) == [("paragraph", "Para one."), ("paragraph", "Para two.")]
    many = "\n".join(
        json.dumps(r)
        for r in [
            {"_id": "a", "title": "Alpha", "text": "About alpha."},
            {"_id": "b", "title": "", "text": "About b."},
        ]
    )
    assert kinds(parse(many, ContentType.JSONL).blocks) == [
        ("heading", "Alpha"),
        ("paragraph", "About alpha."),
        ("heading", "b"),  # no title: the id names the section
        ("paragraph", "About b."),
    ]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ('{"_id": "1", "text": "ok"}\n{not json}', "line 2 is not valid JSON"),
        ('["a", "b"]', "line 1 is a JSON list"),
        ('{"_id": "1", "text": 5}', "line 1: 'text' and 'title' must be strings"),
    ],
)
def test_beir_jsonl_errors_name_the_line(content: str, reason: str) -> None:
    with pytest.raises(FormatError) as err:
        parse(content, ContentType.JSONL)
    assert err.value.code == "invalid" and err.value.field == "content"
    assert reason in err.value.reason and err.value.hint


def test_normalise_line_ends_invisible_characters_and_unicode_forms() -> None:
    assert normalise("a\r\nb\rc") == "a\nb\nc"
    assert normalise("zero\u200bwidth\ufeff soft\u00adhyphen") == "zerowidth softhyphen"
    assert normalise("cafe\u0301\u00a0ok\x07") == "café ok"


def test_blocks_hash_ignores_presentation_but_not_content() -> None:
    base = parse_markdown("# T\n\nSome *text* here.\n").blocks
    assert blocks_hash(base) == blocks_hash(parse_markdown("# T\r\n\r\nSome\r\ntext here.").blocks)
    assert blocks_hash(base) == blocks_hash(
        parse_html("<h1 class='x'>T</h1><p>Some <em>text</em>  here.</p>").blocks
    )
    assert blocks_hash(base) != blocks_hash(parse_markdown("# T\n\nSome text there.\n").blocks)
    assert blocks_hash(base) != blocks_hash(parse_markdown("## T\n\nSome text here.\n").blocks)
