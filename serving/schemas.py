"""Request and response models of the prediction API (pydantic; they make the OpenAPI page).

Inputs are strict: ids are JSON strings, ``k`` a JSON integer, flags JSON booleans; unknown
fields are refused. Every limit below answers 400 with the offending field named.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

MAX_K = 1000
"""Largest ``k`` a request may ask for."""
MAX_LIST = 1000
"""Longest id list (``item_ids``, ``recent_items``) a request may send."""
MAX_ID_LENGTH = 256
"""Longest id, in characters."""

Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]
K = Annotated[int, Field(ge=1, le=MAX_K, description=f"How many items, 1 to {MAX_K}.")]
Path = Literal["user", "fresh", "melu", "recent_items", "feast_recent_items", "popular"]
PATH_HELP = (
    "Which path answered: 'user' (the model knows the user), 'fresh' (the user's embedding "
    "updated by their feedback events since the daily run: the model's row, or for a new "
    "user the mean of their items, moved by each event), 'melu' (a user the model does "
    "not know: the cold-start model MeLU adapted to their recent items, from the request "
    "or Feast, where the gate found it better than the mean embedding), 'recent_items' (an "
    "embedding built from the request's recent items), 'feast_recent_items' (from the "
    "user's recent items in the Feast online store), 'popular' (nothing known: the latest "
    "period's most popular items)."
)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


FORM_ERROR = "body_form"
"""The error type of a rule over several fields; its message starts with the field named."""
MAX_USERS = 1000
"""Most users one ``/recommend`` body may carry (``users``)."""


class BatchUser(_Strict):
    """One user of a batched ``/recommend`` body."""

    user_id: Id = Field(description="The user's raw id, as in the interaction data.")
    recent_items: list[Id] | None = Field(
        None, max_length=MAX_LIST, description="As recent_items of a one-user body.")


class RecommendRequest(_Strict):
    """Top-k recommendations for one user (``user_id``) or for many (``users``: ranked
    together, one matrix product per served model; the answer is ``{"results": [...]}``,
    one one-user answer per user, in order)."""

    user_id: Id | None = Field(None, description="The user's raw id, as in the interaction "
                               "data (send user_id or users).")
    users: list[BatchUser] | None = Field(
        None, min_length=1, max_length=MAX_USERS, description=f"Up to {MAX_USERS} users, "
        "each with optional recent_items, answered in one call (send user_id or users).")
    k: K = 10
    exclude_seen: bool = Field(
        True, description="Leave out items the user is known to have interacted with: the "
        "request's recent_items and, when a feature store is configured, the user's recent "
        "items in it.")
    recent_items: list[Id] | None = Field(
        None, max_length=MAX_LIST, description="Items the user interacted with recently, newest "
        "first. For a user the model does not know, their mean embedding is the user's. With "
        "users, give each user's recent_items in its entry.")

    @model_validator(mode="after")
    def _one_form(self) -> RecommendRequest:
        # A FORM_ERROR's message starts with the field the 400 names (serving/http.py).
        if self.user_id is None and self.users is None:
            raise PydanticCustomError(FORM_ERROR, "user_id is required (or users, a list)")
        if self.user_id is not None and self.users is not None:
            raise PydanticCustomError(FORM_ERROR, "users cannot come with user_id: send one "
                                      "user or a list")
        if self.users is not None and self.recent_items is not None:
            raise PydanticCustomError(FORM_ERROR, "recent_items goes into each entry of "
                                      "users, not beside them")
        return self

    def one_user_requests(self) -> list[RecommendRequest]:
        """The body as one-user requests (itself when it is one)."""
        if self.users is None:
            return [self]
        return [RecommendRequest.model_construct(
            user_id=u.user_id, users=None, k=self.k, exclude_seen=self.exclude_seen,
            recent_items=u.recent_items) for u in self.users]


class ServedBy(BaseModel):
    """The model that answered."""

    stage: Literal["production", "candidate", "popularity"] = Field(
        description="'candidate' when the user is in the canary share; 'popularity' while no "
        "model has been accepted (popular items for everyone outside the canary).")
    version: str = Field(description="The model version (BentoML tag or "
                         "state:<period>:<strategy>).")
    period: str = Field(description="The period whose data trained it ('' for popularity).")
    strategy: str = Field("", description="The retraining strategy that produced it (sml, "
                          "window...: the challenger the gate promoted; '' for popularity).")


class RecommendResponse(BaseModel):
    user_id: str
    items: list[str] = Field(description="Item ids, best first.")
    scores: list[float] = Field(
        description="Model scores; on the 'popular' path the reciprocal popularity rank.")
    model: ServedBy
    path: Path = Field(description=PATH_HELP)
    fallback: bool = Field(description="True unless the model knew the user.")
    ignored_items: list[str] = Field(
        default_factory=list, description="recent_items that were not used: ids the serving "
        "model does not know (all of them while no model is served).")


class RecommendBatchResponse(BaseModel):
    """The answer to a ``users`` body: one answer per user, in the body's order."""

    results: list[RecommendResponse]


class ScoreRequest(_Strict):
    """Scores of given items for one user."""

    user_id: Id
    item_ids: list[Id] = Field(min_length=1, max_length=MAX_LIST)
    recent_items: list[Id] | None = Field(
        None, max_length=MAX_LIST,
        description="For a user the model does not know: their recent items.")


class ScoreResponse(BaseModel):
    user_id: str
    item_ids: list[str]
    scores: list[float]
    model: ServedBy
    path: Path = Field(description=PATH_HELP)


class SimilarRequest(_Strict):
    """Items whose embeddings are closest (cosine) to one item's."""

    item_id: Id
    k: K = 10


class SimilarResponse(BaseModel):
    item_id: str
    items: list[str]
    scores: list[float] = Field(description="Cosine similarity of the item embeddings.")
    model: ServedBy


class Empty(_Strict):
    """No input."""


class Metadata(BaseModel):
    """What is being served and how."""

    mode: Literal["model", "popularity"] = Field(
        description="'popularity' while no production model exists.")
    production: dict[str, Any] | None
    candidate: dict[str, Any] | None
    canary_share: float
    model_source: str
    features: dict[str, Any]
    batching: dict[str, Any]
    swaps: int
    last_check: str | None = Field(description="When the source was last checked for new "
                                   "versions (ISO 8601, UTC).")
    last_error: str
    last_decision: dict[str, Any] = Field(
        default_factory=dict, description="The newest gate decision the served models know "
        "of: the period gated, the decision (promote, reject, bootstrap), the best "
        "challenger, the reasons, when it was recorded.")
    why_popularity: str = Field("", description="In popularity mode: why no model is in "
                                "production.")
    device: str
    limits: dict[str, int]
    feedback: dict[str, Any] = Field(
        default_factory=dict, description="The feedback log (folder, file, events written) "
        "and the per-event user updates (rule, events applied, lag).")


class ReloadResponse(BaseModel):
    swapped: dict[str, str] = Field(description="stage -> version swapped in by this call.")
    production: str | None
    candidate: str | None
    last_error: str


MAX_EVENTS = 1000
"""Most events one /feedback request may carry."""


def _clean_id(value: str) -> str:
    if value != value.strip() or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("an id may not have spaces at either end or control characters "
                         "(newlines, tabs...)")
    return value


EventId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH),
                    AfterValidator(_clean_id)]
"""An id in an event: what the importer would strip or refuse is refused here, so that a
logged day always imports."""


class FeedbackEvent(_Strict):
    """One interaction: the user did something positive with the item (a click, a play, a
    purchase), or rated it."""

    user_id: EventId = Field(description="The user's raw id.")
    item_id: EventId = Field(description="The item's raw id (new items are welcome: they are "
                             "logged for the next daily run).")
    timestamp: float | str | None = Field(
        None, description="When it happened: Unix seconds or ISO 8601 (with a UTC offset, "
        "or UTC if none); default: when it is received. Not in the future (a few minutes of "
        "clock skew allowed).")
    rating: float | None = Field(
        None, description="A rating, in the data's range (0 to 5 by default); without one "
        "the event is an implicit positive. Ratings below the positive threshold (4 by "
        "default) are logged but do not update the user's embedding.")

    @field_validator("timestamp")
    @classmethod
    def _time(cls, value: float | str | None) -> float | None:
        if value is None:
            return None
        if isinstance(value, str):
            text = value.strip()
            try:
                when = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z")
                                              else text)
            except ValueError:
                raise ValueError("not a Unix time or an ISO 8601 date-time") from None
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            value = when.timestamp()
        if not math.isfinite(value) or value < 0:
            raise ValueError("must be a finite Unix time after 1970-01-01")
        return float(value)

    @field_validator("rating")
    @classmethod
    def _rating(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class FeedbackRequest(_Strict):
    """Feedback: one event (its fields at the top level) or a list of them (``events``)."""

    events: list[FeedbackEvent] | None = Field(
        None, min_length=1, max_length=MAX_EVENTS,
        description=f"Up to {MAX_EVENTS} events (instead of one event's fields).")
    user_id: EventId | None = None
    item_id: EventId | None = None
    timestamp: float | str | None = None
    rating: float | None = None

    @model_validator(mode="after")
    def _one_form(self) -> FeedbackRequest:
        single = [f for f in ("user_id", "item_id", "timestamp", "rating")
                  if getattr(self, f) is not None]
        if self.events is not None and single:
            named = ", ".join(single)
            raise ValueError(f"send either events or one event's fields, not both ({named} "
                             "beside events)")
        if self.events is None:
            if "user_id" not in single or "item_id" not in single:
                raise ValueError("an event needs user_id and item_id (or send a list as events)")
            self.events = [FeedbackEvent(user_id=self.user_id, item_id=self.item_id,
                                         timestamp=self.timestamp, rating=self.rating)]
        return self


class FeedbackResponse(BaseModel):
    accepted: int = Field(description="Events written durably to the feedback log.")
    periods: list[str] = Field(description="The periods (YYYY-MM-DD) they were logged under: "
                               "each becomes that period's input to the daily run.")
    user_updates: int = Field(
        description="Positive events queued to update their user's embedding (visible in "
        "/recommend within a second; 0 when per-event updates are off).")
