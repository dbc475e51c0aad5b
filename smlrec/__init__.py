"""smlrec: daily recommender retraining with Sequential Meta-Learning."""

__version__ = "0.1.0"
