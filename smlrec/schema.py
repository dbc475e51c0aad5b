"""Column names and the canonical interaction frame, in one place.

An interactions frame always has these columns:

- ``user_id`` (str): the raw user id as it appears in the source data.
- ``item_id`` (str): the raw item id.
- ``timestamp`` (datetime64[ns, UTC]): when the interaction happened.
- ``rating`` (float32, optional): explicit rating where the source has one.
- ``period`` (str, ``YYYY-MM-DD``): the first day of the period the row falls in.

Every row of a stored interactions frame is a positive (implicit feedback).
"""

USER = "user_id"
ITEM = "item_id"
TS = "timestamp"
RATING = "rating"
PERIOD = "period"

REQUIRED = (USER, ITEM, TS)
INTERACTION_COLUMNS = (USER, ITEM, TS, RATING, PERIOD)

# Integer indices into the model's tables (added by a Vocab, never stored on disk).
UIDX = "uidx"
IIDX = "iidx"
