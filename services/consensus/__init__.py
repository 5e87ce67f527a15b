"""consensus: replicas' signed candidates → one decision with a quorum certificate, or a human."""
