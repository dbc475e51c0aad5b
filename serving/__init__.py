"""BentoML serving for smlrec models."""
