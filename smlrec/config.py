"""Configuration as pydantic models: one documented field per knob, defaults from the paper."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LossConfig(_Config):
    """How the recommendation loss L0 is computed, and which negatives it sees."""

    loss: Literal["bce", "bpr", "softmax"] = Field(
        "bce", description="bce: binary cross-entropy, mean over positives + mean over the "
        "sampled negatives (the official SML code's loss); bpr: Bayesian personalised "
        "ranking, -mean log sigmoid(pos - neg) over each positive's negatives; softmax: "
        "sampled softmax of each positive against the batch's other positives (in-batch "
        "negatives) and its sampled negatives, with the logQ correction.")
    negatives: Literal["uniform", "popularity", "hard"] = Field(
        "uniform", description="uniform: negatives drawn uniformly; popularity: in proportion "
        "to their number of positives in the training data; hard: for each negative, "
        "`hard_pool` uniform candidates are drawn and the one the current model scores "
        "highest is kept (dynamic negative sampling).")
    n_negatives: int = Field(
        1, ge=1, description="Sampled negatives per positive (k). None is ever one of the "
        "user's positives in the training data (unless the user saw the whole pool).")
    hard_pool: int = Field(4, ge=2, description="negatives=hard: candidates per negative.")
    negatives_from: Literal["known", "batch_data"] = Field(
        "known", description="known: every item the model knows; batch_data: only items "
        "present in the data being trained on.")
    temperature: float = Field(1.0, gt=0, description="softmax: logits are divided by this.")
    logq: bool = Field(True, description="softmax: subtract log Q(item), the log of each "
                       "candidate's expected count under its sampling distribution, so "
                       "popular in-batch items are not over-penalised (Yi et al., 2019).")


class MFConfig(_Config):
    """Plain MF training (pretraining W_0 and the retraining baselines)."""

    lr: float = Field(1e-2, gt=0, description="Adam learning rate.")
    batch_size: int = Field(1024, gt=0, description="Positives per mini-batch.")
    epochs: int = Field(1, ge=1, description="Passes over the training data.")
    l2: float = Field(1e-6, ge=0, description="L2 weight on the embedding rows in each batch.")


class SMLConfig(_Config):
    """Sequential Meta-Learning (Zhang et al., SIGIR 2020); defaults from the official code."""

    outer_steps: int = Field(
        3, ge=1, description="Alternations of step 2 (update Θ) and step 1 (learn Ŵ_t) per "
        "period (the official runs use 7-10).")
    what_lr: float = Field(1e-2, gt=0, description="Step 1: Adam learning rate for Ŵ_t.")
    what_batch_size: int = Field(1024, gt=0, description="Step 1: positives per batch.")
    what_epochs: int = Field(1, ge=1, description="Step 1: passes over D_t per outer step.")
    what_l2: float = Field(1e-6, ge=0, description="Step 1: λ1, L2 on the Ŵ_t rows of a batch.")
    what_window: int = Field(
        1, ge=1, description="Step 1 learns Ŵ_t on the last n periods, D_t and the n - 1 "
        "before it (1: D_t alone, the paper). More than 1 replays recent data, as the sliding "
        "window does; step 2 always learns Θ on D_t alone.")
    theta_lr: float = Field(1e-3, gt=0, description="Step 2: Adam learning rate for Θ.")
    theta_batch_size: int = Field(256, gt=0, description="Step 2: positives per batch.")
    theta_epochs: int = Field(1, ge=1, description="Step 2: passes over D_t per outer step.")
    theta_weight_decay: float = Field(1e-4, ge=0, description="Step 2: λ2 (Adam weight decay).")
    theta_init: Literal["random", "identity"] = Field(
        "random", description="random: PyTorch's default initialisation of Θ (the paper); "
        "identity: before meta-training, fit Θ so that f_Θ(a, b) ≈ b on rows of W_0, so the "
        "transfer starts as plain fine-tuning and meta-learning improves on it.")
    transfer: Literal["official", "residual", "gated"] = Field(
        "official", description="The form of f_Θ. official: the paper's CNN, whose output "
        "is the new row (no residual); residual: Ŵ_t + CNN(·), the CNN's last layer starting "
        "at zero, so the transfer starts as fine-tuning; gated: g ⊙ W_{t-1} + (1 - g) ⊙ Ŵ_t "
        "+ CNN(·), with a per-dimension gate g read from the same 3 x d grid.")
    transfer_rows: Literal["all", "trained"] = Field(
        "all", description="all: W_t = f_Θ(W_{t-1}, Ŵ_t) for every row (the paper); trained: "
        "only for the rows step 1 trained, the others keep W_{t-1} (residual or gated "
        "transfer only), so a row with no new data is not corrected again every period.")
    hidden: int = Field(512, ge=4, description="Width of the transfer's hidden layer "
                        "(the paper: 512).")
    meta_passes: int = Field(
        1, ge=1, description="Passes over the meta-training periods: after each pass but the "
        "last, the chain restarts from W_0 keeping Θ and its optimiser state.")
    schedule: Literal["per_period", "official"] = Field(
        "per_period", description="per_period: outer_steps x (step 2 on D_t with W_{t-2}, "
        "Ŵ_{t-1}; step 1 for Ŵ_t). official: the official code's order, per period: "
        "outer_steps x (step 2 on D_t; step 1 re-learns Ŵ_{t-1} on D_{t-1}), then W_{t-1} = "
        "f_Θ(W_{t-2}, Ŵ_{t-1}) with the updated Θ, then one round of step 1 for Ŵ_t. The "
        "daily pipeline runs per_period.")


class MethodSpec(_Config):
    """One strategy and its parameters, as in a backtest grid (see
    ``smlrec.strategies.PARAMS`` for what each method takes)."""

    method: Literal["sml", "full", "finetune", "window", "pop"] = Field(
        description="sml, full (all history), finetune (new period only), window (last n "
        "periods) or pop (popularity).")
    params: dict[str, Any] = Field(default_factory=dict, description="Flat parameters, e.g. "
                                   "{window: 3, epochs: 20, lr: 0.003, blend: 4}.")


class ColdConfig(_Config):
    """The cold-start model of the daily run (MeLU; see ``smlrec.coldstart``), chosen on
    validation periods by the cold-start benchmark."""

    melu: dict[str, Any] = Field(default_factory=dict, description="MeLUConfig fields.")
    blend: float = Field(0.0, ge=0, description="Served MeLU score + blend·log1p(floor "
                         "popularity) (0: MeLU alone).")
    support: int = Field(3, ge=1, description="Gate: new users' first this many items are "
                         "the support, the rest the query.")
    path: Literal["auto", "melu", "recent_items"] = Field(
        "auto", description="How the service answers users the model does not know: auto "
        "(MeLU where the latest gate found it better than the mean embedding of their recent "
        "items and the floor on the period's new users, else the mean embedding), melu or "
        "recent_items (always that path; the gate still scores both).")
    pretrain_epochs: int = Field(20, ge=1, description="Bootstrap: passes over the "
                                 "pretraining periods' tasks.")
    epochs: int = Field(3, ge=1, description="Passes over the newest periods' tasks after "
                        "each period.")
    replay: int = Field(3, ge=1, description="Periods of tasks meta-trained on after each "
                        "period (the newest and the ones before it).")
    max_support: int = Field(5, ge=1, description="Training tasks: a new user's support is "
                             "their first s items, s drawn from 1..max_support.")
    recent: int = Field(20, ge=1, description="Training tasks: a returning user's support "
                        "is their this many most recent items.")


class FreshnessConfig(_Config):
    """What the API does between daily runs with each feedback event (``serving/fresh.py``),
    chosen on validation periods by the freshness benchmark's prequential replay."""

    user_update: dict[str, Any] = Field(
        default_factory=dict, description="smlrec.online.UserUpdate fields: how an event "
        "moves its user's embedding (packaged with the model; the API's SMLREC_USER_UPDATE "
        "overrides).")
    ftrl: dict[str, Any] = Field(
        default_factory=dict, description="The FTRL reranker's settings as measured (the "
        "replay's; not served yet).")
    chosen_on: str = Field("", description="Provenance, for people.")

    @field_validator("user_update")
    @classmethod
    def _rule(cls, value: dict[str, Any]) -> dict[str, Any]:
        from smlrec.online import UserUpdate

        return UserUpdate.model_validate(value).model_dump()


class DailyConfig(_Config):
    """What the daily run trains and how it decides: one file per dataset
    (``configs/<dataset>.yaml``), written by the backtest's selection on validation periods
    (``smlrec backtest --write-config``) and read by the bootstrap and daily pipelines.

    The challengers are retrained every period; the gate scores each of them, the incumbent
    and the popularity floor on the next period and promotes the best challenger that beats
    the floor and is within ``tolerance`` of the incumbent.
    """

    dataset: str = Field("", description="The dataset the configuration was chosen on.")
    period: str = Field("", description="Its period length (7D, 1D...), for reference.")
    challengers: list[MethodSpec] = Field(
        default_factory=lambda: [MethodSpec(method="sml")],
        description="The strategies trained each period; exactly one is sml.")
    floor: MethodSpec = Field(
        default_factory=lambda: MethodSpec(method="pop", params={"window": 1}),
        description="The popularity variant every challenger must beat at the gate.")
    sml: SMLConfig = Field(default_factory=SMLConfig, description="SML defaults (the sml "
                           "challenger's params override them).")
    loss: LossConfig = Field(default_factory=LossConfig, description="Loss defaults.")
    mf: MFConfig = Field(default_factory=MFConfig, description="MF retraining defaults.")
    cold: ColdConfig | None = Field(None, description="The cold-start model (MeLU) trained, "
                                    "gated and packaged beside the challengers; none: "
                                    "users the model does not know get the mean embedding "
                                    "of their recent items.")
    freshness: FreshnessConfig | None = Field(
        None, description="Per-event user updates in the API between daily runs; none: the "
        "built-in default rule.")
    tolerance: float = Field(0.05, ge=0, lt=1, description="Gate: a challenger may be this "
                             "much (relative) below the incumbent's NDCG@20 and still promote.")
    incumbent_test: Literal["bootstrap", "point"] = Field(
        "bootstrap", description="Gate: how 'worse than the incumbent beyond the tolerance' "
        "is judged. bootstrap: the whole 95% paired bootstrap interval of challenger / "
        "incumbent over the period's users lies below 1 - tolerance; point: the point "
        "estimate does.")
    pretrain_periods: int = Field(10, ge=1, description="Bootstrap: periods W_0 trains on.")
    pretrain_epochs: int = Field(20, ge=1, description="Bootstrap: MF epochs for W_0.")
    pretrain_lr: float = Field(1e-2, gt=0, description="Bootstrap: Adam learning rate for W_0.")
    seed: int = 0
    device: str = "cpu"
    selection: dict[str, Any] = Field(
        default_factory=dict, description="Provenance, for people: what the backtest measured "
        "when it chose this configuration (not read by the pipeline).")

    @model_validator(mode="after")
    def _one_sml(self) -> DailyConfig:
        methods = [c.method for c in self.challengers]
        if methods.count("sml") != 1:
            raise ValueError(f"challengers must hold exactly one sml strategy, got {methods}")
        if len(set(methods)) != len(methods):
            raise ValueError(f"each challenger method may appear once, got {methods}")
        if "pop" in methods:
            raise ValueError("pop is the floor, not a challenger")
        if self.floor.method != "pop":
            raise ValueError(f"the floor must be a pop variant, got {self.floor.method}")
        return self

    @property
    def names(self) -> list[str]:
        """Challenger names (their method names), SML first."""
        return sorted((c.method for c in self.challengers), key=lambda m: m != "sml")

    def challenger(self, name: str) -> MethodSpec:
        return next(c for c in self.challengers if c.method == name)

    @classmethod
    def load(cls, path: str, **override: Any) -> DailyConfig:
        """Read a YAML (or JSON) configuration file; ``override`` replaces fields."""
        import fsspec
        import yaml

        with fsspec.open(path, "rt") as fh:
            doc = yaml.safe_load(fh) or {}
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: expected a mapping of settings, got {type(doc).__name__}")
        return cls(**{**doc, **override})

    def to_yaml(self) -> str:
        import yaml

        doc = self.model_dump(mode="json", exclude={"device"})
        return yaml.safe_dump(doc, sort_keys=False, width=100)
