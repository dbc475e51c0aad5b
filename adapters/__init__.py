"""Adapters to external systems that both the pipeline (``components/``) and the prediction
API (``serving/``) use, so that neither imports the other's package: the Feast feature store
(``feast_store.py``). The core library (``smlrec/``) imports none of them."""
