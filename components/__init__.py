"""KFP components and the adapters they use (Feast, BentoML) around the smlrec core."""
