"""The infer service: grounded answers from LM backends behind breakers, a fallback chain and
degradation tiers, one signed CandidateAnswer per replica (see :mod:`.app`)."""
