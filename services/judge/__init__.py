"""The judge service: grounding and quality scores of an answer, and its revision rounds."""
