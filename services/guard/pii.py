"""PII detectors: rules with validation, no model (fast, explainable, no network).

Each detector yields :class:`~stratamesh.security.pseudonym.Span` objects with a confidence;
guard pseudonymises spans scoring at least ``GuardSettings.pii_min_score`` (0.5).

- EMAIL_ADDRESS: local@domain.tld — 1.0
- CREDIT_CARD: 12–19 digits (spaces/dashes allowed) passing Luhn — 1.0; failing Luhn 0.3
  (reported, not redacted)
- IBAN_CODE: country, check digits, 11–30 alphanumerics, ISO 13616 mod-97 = 1 — 1.0
- US_SSN: AAA-GG-SSSS outside the never-issued ranges (000, 666, 9xx; 00; 0000) — 0.9
- IP_ADDRESS: IPv4 (octets ≤ 255), IPv6 (validated by ``ipaddress``) — 0.9
- PHONE_NUMBER: 7–15 digits in phone shape (``+``/``(…)`` prefix or ≥ 2 separators) — 0.8;
  a bare digit run only after a phone cue ("phone", "mobile", "fax" …) — 0.6
- DATE_OF_BIRTH: a date right after a birth cue (born, DOB, date of birth, birthday) — 0.9
- STREET_ADDRESS: house number + street words + suffix (English order), Romance
  (``Rue …  38``), Germanic/Nordic (``…straße 5``, ``…vej 298``) and number-name-number forms,
  apartment/suite units, military addresses, ``City, ST 12345`` — 0.8; the rest of the line
  after an address cue ("address:", "lives at", "ship to" …) when it holds a number next to a
  capitalised word — 0.7
- PERSON: a cue (Mr/Ms/Dr …, "my name is", "Name:", "I'm", "last name") + capitalised words
  — 0.9; a known given name (packaged ``given_names.json``) + capitalised surname — 0.8; a
  name before "lives/works/said …" — 0.7; a name line in a block of contact details — 0.7;
  a known given name alone — 0.6 (0.4 at a sentence start or when it is also a common word);
  a known given name in lower case — 0.5; capitalised words ending in a surname form
  (-sson, -sen, -ova, -ić, -dóttir, -escu …) — 0.6; a list of three or more capitalised words,
  most of them known given names — 0.6

Dates that are not birth dates, organisations, places and nationalities are not personal
identifiers on their own and are not pseudonymised (pseudonymising "Berlin" or "Kafka" would
break retrieval and answers); :func:`detect` can report them with ``broad=True``, scored
below the default threshold, for evaluation.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Iterator
from functools import lru_cache
from importlib import resources
from typing import Final

from stratamesh.security.pseudonym import Span

__all__ = ["detect", "iban_valid", "luhn_valid", "ssn_valid"]

# -- validators ---------------------------------------------------------------------------


def luhn_valid(number: str) -> bool:
    """The Luhn (mod-10) check of a card number (separators ignored)."""
    digits = [int(c) for c in number if c.isdigit()]
    if len(digits) < 12:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        doubled = d * 2 if i % 2 == 1 else d
        total += doubled - 9 if doubled > 9 else doubled
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters → 10..35, mod 97 = 1."""
    s = "".join(iban.split()).upper()
    if not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]{11,30}", s):
        return False
    rearranged = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def ssn_valid(ssn: str) -> bool:
    digits = "".join(c for c in ssn if c.isdigit())
    if len(digits) != 9:
        return False
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    return not (area in {"000", "666"} or area[0] == "9" or group == "00" or serial == "0000")


# -- patterns -----------------------------------------------------------------------------

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,24}\b")
_CARD = re.compile(r"(?<![\d+-])(?:\d[ -]?){11,18}\d(?![\d-])")
_IBAN = re.compile(r"\b[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]){11,30}\b")
_SSN = re.compile(r"(?<![\d-])\d{3}-\d{2}-\d{4}(?![\d-])")
_SSN_CUE = re.compile(r"\b(?:ssn|social security(?: number| no\.?)?)\W{0,3}(\d{9})\b", re.I)
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(0?\d{1,4}\)[\s.-]?)?\d{1,5}(?:[\s.-]\d{1,5}){0,5}"
    r"(?:\s?(?:x|ext\.?)\s?\d{1,5})?(?![\w])"
)
_PHONE_CUE = re.compile(
    r"\b(?:phone|tel|telephone|mobile|cell|fax|call|text|whatsapp|contact|desk|landline)\b", re.I
)
_DATE = re.compile(
    r"\b(?:\d{4}-\d{1,2}-\d{1,2}(?:[ T]\d{2}:\d{2}(?::\d{2})?)?"
    r"|\d{1,2}[/.-]\d{1,2}[/.-]\d{2,4}"
    r"|\d{1,2}(?:st|nd|rd|th)? (?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]*\.?,? \d{4}"
    r"|(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]*\.? \d{1,2}(?:st|nd|rd|th)?,?"
    r" \d{4})\b"
)
_DOB_CUE = re.compile(
    r"\b(?:born(?: on| in)?|d\.?o\.?b\.?|date of birth|birth ?date|birthday)\b[:\s]*", re.I
)

_STREET_SUFFIX = (
    r"(?:Street|St|Avenue|Ave|Road|Rd|Lane|Ln|Drive|Dr|Court|Ct|Boulevard|Blvd|Way|Place|Pl"
    r"|Terrace|Ter|Circle|Cir|Parkway|Pkwy|Highway|Hwy|Square|Sq|Trail|Trl|Crescent|Close"
    r"|Row|Alley|Plaza|Route|Mews|Gardens|Grove|Hill|Park|Fort|Ridge|Point|Loop|Pike|Walk)"
)
_UNIT = r"(?:,?\s*(?:Apt\.?|Apartment|Suite|Ste\.?|Unit|#)\s*\w{1,6})?"
_ADDRESS_PATTERNS: Final = (
    # 1600 Pennsylvania Avenue NW, Apt. 5 — English order.
    re.compile(
        r"\b\d{1,6}[A-Za-z]?\s+(?:[A-Z][\w'.-]*\s+){1,4}" + _STREET_SUFFIX + r"\b\.?"
        r"(?:\s+(?:N|S|E|W|NE|NW|SE|SW)\b)?" + _UNIT
    ),
    # Rue de Virton 38, Avda. Rio Nalon 58, Via Roma 12 — Romance order.
    re.compile(
        r"\b(?:Rue|Avenue|Av\.|Avda\.?|Avenida|Calle|C/|Via|Viale|Piazza|Plaza|Rua|Praça"
        r"|Chemin|Boulevard|Bd|Place|Allée|Impasse|Quai|Paseo|Camino|Largo|Travessa)"
        r"\s+(?:[\w'.-]+\s+){0,4}\d{1,5}\w?\b" + _UNIT
    ),
    # Hauptstraße 5, Magrethevej 298, Kungsgatan 12, Erzsébet tér 19 — Germanic/Nordic/…
    re.compile(
        r"\b[A-ZÀ-Ý][\w'-]*(?:stra(?:ß|ss)e|str\.|weg|gasse|allee|platz|ring|damm|vej|gade|vænget"
        r"|gata|gatan|vägen|väg|veien|vegen|gate|katu|tie|kuja|laan|straat|gracht|plein|utca"
        r"|út|tér|ulica|ul\.)\s+\d{1,5}\w?\b" + _UNIT
    ),
    re.compile(
        r"\b[A-ZÀ-Ý][\w'-]+\s+(?:tér|utca|út|Straße|Strasse|Weg|Gasse|Allee|Platz|vej|gade)"
        r"\s+\d{1,5}\w?\b\.?" + _UNIT
    ),
    # 5049 Harjukuja 54, 23680 Parijsstraat 8: a building number, street words, a number.
    re.compile(
        r"\b\d{1,6}[ \t]+(?:ul\.[ \t]+)?[A-ZÀ-Ý][a-zà-ÿ][\w'.-]+(?:[ \t]+[\w'.-]+){0,2}"
        r"[ \t]+\d{1,5}\b(?![.,]\d)"
    ),
    # 56 rue La Boétie, 33 avenue de Provence: a number before a lower-case Romance prefix.
    re.compile(
        r"\b\d{1,5},?\s+(?:rue|avenue|avda\.?|calle|via|viale|piazza|rua|chemin|boulevard"
        r"|place|allée|quai|paseo|camino)\s+(?:[\w'.-]+\s+){0,3}[A-ZÀ-Ý][\w'.-]*"
    ),
    re.compile(r"\b(?:FPO|APO|DPO)\s+[A-Z]{2}\s+\d{5}\b"),
    # Units and boxes on their own line, and a US "City, ST 12345" tail.
    re.compile(r"\b(?:Apt\.?|Apartment|Suite|Ste\.?|Unit)\s+\d{1,6}(?:\s+Box\s+\d{1,6})?\b"),
    re.compile(r"\b(?:PSC|USNS|USNV|USS|USCGC)\s+[\w ]{1,20}\d{2,5}\b"),
    re.compile(r"\b[A-Z][a-z]+(?:\s[A-Z][a-z]+)?,\s*[A-Z]{2}\s+\d{5}(?:-\d{4})?\b"),
)

_CAP = r"[A-ZÀ-ÖØ-ÝŁŚŻŹĆŃÓŠŽČŘĐ][\w'’-]+"
_INITIAL = r"[A-Z]\."
_NAME_SEQ = (
    rf"{_CAP}(?:[ \t]+(?:{_CAP}|{_INITIAL}|(?:van|von|de|da|di|del|der|den|la|le|du)"
    rf"(?=[ \t]+{_CAP}))){{0,3}}"
)
_PERSON_CUES: Final = (
    re.compile(
        rf"\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Sir|Madam|Herr|Frau|Mme|Mlle|Sr|Sra)\.?\s+({_NAME_SEQ})"
    ),
    re.compile(
        r"\b(?:[Mm]y name is|[Nn]ame\s*:|I am|I'm|I’m|[Tt]his is|[Dd]ear|[Ss]igned,?"
        rf"|[Rr]egards,?)\s+({_NAME_SEQ})"
    ),
    re.compile(
        rf"(?i:\b(?:last name|surname|first name|family name|full name)\b)\W{{1,6}}({_NAME_SEQ})"
    ),
)
_PERSON_VERB = re.compile(
    rf"\b({_NAME_SEQ})\s+(?:lives|lived|works|worked|was born|is from|was from|said|says|told"
    r"|explained|wrote|replied|asked)\b"
)
_LOWER_CUE = re.compile(
    r"(?i:\bmy name is|\bname\s*:)\s+([a-zà-ÿ][\w'’-]{1,30}(?:\s+[a-zà-ÿ][\w'’-]{1,30})?)"
)
_SURNAME = re.compile(
    r"(?:sson|sen|ssen|dóttir|dottir|ova|ová|ovа|eva|ev|ov|ski|ska|sky|ský|cki|cka|vić|vic|ić"
    r"|ová|escu|enko|chuk|yan|ian|idis|opoulos|akis|oglu|oğlu|berg|mann|stein|ström|strom"
    r"|qvist|quist|gaard|lund|holm|ez|ini|elli|etti|ucci|aki|ainen|inen|nen|oui)$"
)
_CAP_LIST = re.compile(rf"{_CAP}(?:,\s*{_CAP}){{1,12}},?\s+and\s+{_CAP}")
_ADDRESS_CUE = re.compile(
    r"(?i:\b(?:address(?: is)?|lives (?:at|on)|located at|ship(?:ped)? to|deliver(?:ed)? to"
    r"|send it to|moved to))\s*:?[ \t]+([^\n.;]{4,80})"
)
# A number and a capitalised word in either order: "12 Main", "Parijsstraat 8".
_ADDRESS_SHAPE = re.compile(r"(?:\d{1,6}[A-Za-z]?,?\s+[A-ZÀ-Ý]|[A-ZÀ-Ý][\w'.-]+\s+\d{1,6}\b)")
_NAME_LINE = re.compile(rf"(?m)^(?:>\s*)?({_NAME_SEQ})[ \t]*$")
_CAP_TOKEN = re.compile(_CAP)
_AMBIGUOUS: Final = frozenset(
    [
        "will",
        "may",
        "mark",
        "grace",
        "rose",
        "faith",
        "hope",
        "joy",
        "bill",
        "frank",
        "max",
        "art",
        "june",
        "april",
        "august",
        "victor",
        "dean",
        "earl",
        "guy",
        "major",
        "page",
        "lane",
        "ray",
        "rich",
        "sky",
        "summer",
        "tom",
        "angel",
        "amber",
        "ben",
        "christian",
        "roman",
        "pierre",
        "chloe",
        "jordan",
        "victoria",
        "florence",
        "georgia",
        "virginia",
    ]
)
# Words that are capitalised for reasons other than being a name (after "I'm", "This is" …).
_NOT_NAMES: Final = frozenset(
    [
        "i",
        "a",
        "an",
        "the",
        "this",
        "that",
        "these",
        "those",
        "here",
        "there",
        "it",
        "we",
        "you",
        "he",
        "she",
        "they",
        "my",
        "our",
        "your",
        "his",
        "her",
        "their",
        "not",
        "just",
        "very",
        "so",
        "from",
        "in",
        "on",
        "at",
        "to",
        "for",
        "of",
        "with",
        "and",
        "or",
        "but",
        "sorry",
        "happy",
        "glad",
        "sure",
        "looking",
        "trying",
        "going",
        "writing",
        "calling",
        "interested",
        "available",
        "unable",
        "able",
        "new",
    ]
)


@lru_cache(maxsize=1)
def _given_names() -> frozenset[str]:
    raw = resources.files(__package__).joinpath("given_names.json").read_text("utf-8")
    return frozenset(json.loads(raw))


def _sentence_start(text: str, pos: int) -> bool:
    before = text[:pos].rstrip(" \t\"'(“")
    return not before or before[-1] in ".!?\n:;"


def _emails(text: str) -> Iterator[Span]:
    for m in _EMAIL.finditer(text):
        yield Span("EMAIL_ADDRESS", m.start(), m.end(), 1.0)


def _cards(text: str) -> Iterator[Span]:
    for m in _CARD.finditer(text):
        raw = m.group(0)
        digits = sum(c.isdigit() for c in raw)
        if 12 <= digits <= 19:
            yield Span("CREDIT_CARD", m.start(), m.end(), 1.0 if luhn_valid(raw) else 0.3)


def _ibans(text: str) -> Iterator[Span]:
    for m in _IBAN.finditer(text):
        # The pattern runs on into following words ("GB82… to other"): the longest prefix of
        # whole groups that passes mod-97 is the IBAN.
        groups = m.group(0).rstrip().split(" ")
        for k in range(len(groups), 0, -1):
            raw = " ".join(groups[:k])
            if iban_valid(raw):
                yield Span("IBAN_CODE", m.start(), m.start() + len(raw), 1.0)
                break


def _ssns(text: str) -> Iterator[Span]:
    for m in _SSN.finditer(text):
        if ssn_valid(m.group(0)):
            yield Span("US_SSN", m.start(), m.end(), 0.9)
    for m in _SSN_CUE.finditer(text):
        if ssn_valid(m.group(1)):
            yield Span("US_SSN", m.start(1), m.end(1), 0.9)


def _ips(text: str) -> Iterator[Span]:
    for m in _IPV4.finditer(text):
        if all(int(p) <= 255 for p in m.group(0).split(".")):
            yield Span("IP_ADDRESS", m.start(), m.end(), 0.9)
    for m in _IPV6.finditer(text):
        raw = m.group(0)
        if raw.count(":") >= 2 and any(c.isalnum() for c in raw):
            try:
                ipaddress.IPv6Address(raw)
            except ValueError:
                continue
            yield Span("IP_ADDRESS", m.start(), m.end(), 0.9)


def _plausible_date(raw: str) -> bool:
    parts = re.split(r"[/.-]", raw.split(maxsplit=1)[0]) if raw[:1].isdigit() else []
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return True  # named months, or ISO with a time: the pattern already constrains them
    a, b, c = (int(p) for p in parts)
    if len(parts[0]) == 4:  # ISO year-month-day
        return 1 <= b <= 12 and 1 <= c <= 31
    return 1 <= a <= 31 and 1 <= b <= 31 and min(a, b) <= 12


def _dates(text: str, broad: bool) -> Iterator[Span]:
    cues = [m.end() for m in _DOB_CUE.finditer(text)]
    for m in _DATE.finditer(text):
        if not _plausible_date(m.group(0)):
            continue  # 01.84.17 is a phone number's start, not a date
        if any(0 <= m.start() - end <= 12 for end in cues):
            yield Span("DATE_OF_BIRTH", m.start(), m.end(), 0.9)
        elif broad:
            yield Span("DATE_TIME", m.start(), m.end(), 0.3)


def _phones(text: str, taken: list[Span]) -> Iterator[Span]:
    for m in _PHONE.finditer(text):
        raw = m.group(0).strip()
        start = m.start() + (len(m.group(0)) - len(m.group(0).lstrip()))
        end = start + len(raw)
        main = re.split(r"\s?(?:x|ext\.?)\s?(?=\d)", raw, maxsplit=1)[0]
        digits = sum(c.isdigit() for c in main)
        if not 7 <= digits <= 15:
            continue
        if any(s.start < end and start < s.end for s in taken):
            continue  # a date, card, IP or SSN already explains these digits
        separators = sum(1 for c in raw if c in " .-")
        shaped = raw.startswith(("+", "(")) or separators >= 2
        cue = _PHONE_CUE.search(text, max(0, start - 40), start) is not None
        if shaped and (separators >= 2 or digits >= 9 or cue):
            yield Span("PHONE_NUMBER", start, end, 0.8)
        elif cue:
            yield Span("PHONE_NUMBER", start, end, 0.6)


def _addresses(text: str) -> Iterator[Span]:
    for pattern in _ADDRESS_PATTERNS:
        for m in pattern.finditer(text):
            yield Span("STREET_ADDRESS", m.start(), m.end(), 0.8)
    for m in _ADDRESS_CUE.finditer(text):
        # After an address cue, the rest of the line is the address when it has a number.
        value = m.group(1)
        if _ADDRESS_SHAPE.match(value) and "0x" not in value:
            yield Span("STREET_ADDRESS", m.start(1), m.end(1), 0.7)


def _persons(text: str, broad: bool) -> Iterator[Span]:
    for cue in _PERSON_CUES:
        for m in cue.finditer(text):
            seq = m.group(1)
            first = seq.split()[0].lower()
            if first in _NOT_NAMES:
                continue
            yield Span("PERSON", m.start(1), m.end(1), 0.9)
    for m in _PERSON_VERB.finditer(text):
        tokens = m.group(1).split()
        if tokens[0].lower() in _NOT_NAMES:
            continue
        if len(tokens) >= 2 or tokens[0].lower() in _given_names():
            yield Span("PERSON", m.start(1), m.end(1), 0.7)
    for m in _LOWER_CUE.finditer(text):
        if m.group(1).split()[0] not in _NOT_NAMES:
            yield Span("PERSON", m.start(1), m.end(1), 0.8)
    names = _given_names()
    for m in re.finditer(r"\b[a-zà-ÿ]{5,}\b", text):
        word = m.group(0)
        if word in names and word not in _AMBIGUOUS:
            yield Span("PERSON", m.start(), m.end(), 0.5)
    for m in re.finditer(_NAME_SEQ, text):
        tokens = m.group(0).split()
        first = tokens[0].lower()
        start = m.start()
        if first not in names:
            if len(tokens) >= 2 and _SURNAME.search(tokens[-1]) and first not in _NOT_NAMES:
                # "Hedvig Arvidsson", "Valida M. Ibragimov": a surname by its morphology.
                yield Span("PERSON", start, m.end(), 0.6)
            elif broad and not _sentence_start(text, start):
                yield Span("PROPER_NOUN", start, m.end(), 0.3)
            continue
        if len(tokens) >= 2:
            yield Span("PERSON", start, m.end(), 0.8)
        elif first in _AMBIGUOUS:
            yield Span("PERSON", start, m.end(), 0.4)
        elif _sentence_start(text, start):
            yield Span("PERSON", start, m.end(), 0.55)
        else:
            yield Span("PERSON", start, m.end(), 0.6)
    # "Mary, Ariana, Isabel and Jodi": a list in which known names are the majority.
    for m in _CAP_LIST.finditer(text):
        items = [i for i in re.split(r",\s*|\s+and\s+", m.group(0)) if i]
        known = sum(1 for i in items if i.split()[0].lower() in names)
        if len(items) >= 3 and known * 2 >= len(items):
            pos = m.start()
            for item in items:
                at = text.index(item, pos)
                pos = at + len(item)
                yield Span("PERSON", at, pos, 0.6)


def detect(text: str, *, min_score: float = 0.0, broad: bool = False) -> list[Span]:
    """Every PII span of ``text`` scoring at least ``min_score`` (overlaps resolved later
    by the pseudonymiser: the longer span wins)."""
    if not text:
        return []
    structured: list[Span] = [
        *_emails(text),
        *_cards(text),
        *_ibans(text),
        *_ssns(text),
        *_ips(text),
        *_dates(text, broad=True),
    ]
    spans: list[Span] = [s for s in structured if broad or s.entity_type != "DATE_TIME"]
    # Digits a confident detector explained are not a phone; a Luhn-failing "card" may be one.
    explained = [s for s in structured if s.score >= 0.5 or s.entity_type == "DATE_TIME"]
    spans.extend(_phones(text, explained))
    spans.extend(_addresses(text))
    spans.extend(_persons(text, broad))
    if spans:
        # A line holding only 2–4 capitalised words, in a text that already holds contact
        # details, is the name line of a signature or an address block.
        for m in _NAME_LINE.finditer(text):
            if (
                2 <= len(m.group(1).split()) <= 4
                and m.group(1).split()[0].lower() not in _NOT_NAMES
            ):
                spans.append(Span("PERSON", m.start(1), m.end(1), 0.7))
    return [s for s in spans if s.score >= min_score]


def categories(spans: Iterable[Span]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in spans:
        out[s.entity_type] = out.get(s.entity_type, 0) + 1
    return out
