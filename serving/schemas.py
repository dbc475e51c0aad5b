"""Request and response models of the prediction API (pydantic; they make the OpenAPI page).

Inputs are strict: ids are JSON strings, ``k`` a JSON integer, flags JSON booleans; unknown
fields are refused. Every limit below answers 400 with the offending field named.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_K = 1000
"""Largest ``k`` a request may ask for."""
MAX_LIST = 1000
"""Longest id list (``item_ids``, ``recent_items``) a request may send."""
MAX_ID_LENGTH = 256
"""Longest id, in characters."""

Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]
K = Annotated[int, Field(ge=1, le=MAX_K, description=f"How many items, 1 to {MAX_K}.")]
Path = Literal["user", "melu", "recent_items", "feast_recent_items", "popular"]
PATH_HELP = (
    "Which path answered: 'user' (the model knows the user), 'melu' (a user the model does "
    "not know: the cold-start model MeLU adapted to their recent items, from the request "
    "or Feast, where the gate found it better than the mean embedding), 'recent_items' (an "
    "embedding built from the request's recent items), 'feast_recent_items' (from the "
    "user's recent items in the Feast online store), 'popular' (nothing known: the latest "
    "period's most popular items)."
)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class RecommendRequest(_Strict):
    """Top-k recommendations for one user."""

    user_id: Id = Field(description="The user's raw id, as in the interaction data.")
    k: K = 10
    exclude_seen: bool = Field(
        True, description="Leave out items the user is known to have interacted with: the "
        "request's recent_items and, when a feature store is configured, the user's recent "
        "items in it.")
    recent_items: list[Id] | None = Field(
        None, max_length=MAX_LIST, description="Items the user interacted with recently, newest "
        "first. For a user the model does not know, their mean embedding is the user's.")


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


class ReloadResponse(BaseModel):
    swapped: dict[str, str] = Field(description="stage -> version swapped in by this call.")
    production: str | None
    candidate: str | None
    last_error: str
