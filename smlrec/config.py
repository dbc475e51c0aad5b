"""Configuration as pydantic models: one documented field per knob, defaults from the paper."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LossConfig(_Config):
    """How the recommendation loss L0 is computed."""

    loss: Literal["bce", "bpr"] = Field(
        "bce", description="bce: binary cross-entropy with one sampled negative per positive "
        "(mean over positives + mean over negatives, as the official SML code); bpr: "
        "Bayesian personalised ranking, -mean log sigmoid(pos - neg).")
    negatives: Literal["uniform", "popularity"] = Field(
        "uniform", description="Negative items drawn uniformly, or in proportion to their "
        "number of positives in the training data.")
    negatives_from: Literal["known", "batch_data"] = Field(
        "known", description="known: every item the model knows; batch_data: only items "
        "present in the data being trained on.")


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
    theta_lr: float = Field(1e-3, gt=0, description="Step 2: Adam learning rate for Θ.")
    theta_batch_size: int = Field(256, gt=0, description="Step 2: positives per batch.")
    theta_epochs: int = Field(1, ge=1, description="Step 2: passes over D_t per outer step.")
    theta_weight_decay: float = Field(1e-4, ge=0, description="Step 2: λ2 (Adam weight decay).")
    theta_init: Literal["random", "identity"] = Field(
        "random", description="random: PyTorch's default initialisation of Θ (the paper); "
        "identity: before meta-training, fit Θ so that f_Θ(a, b) ≈ b on rows of W_0, so the "
        "transfer starts as plain fine-tuning and meta-learning improves on it.")
    schedule: Literal["per_period", "official"] = Field(
        "per_period", description="per_period: outer_steps x (step 2 on D_t with W_{t-2}, "
        "Ŵ_{t-1}; step 1 for Ŵ_t). official: the official code's order, per period: "
        "outer_steps x (step 2 on D_t; step 1 re-learns Ŵ_{t-1} on D_{t-1}), then W_{t-1} = "
        "f_Θ(W_{t-2}, Ŵ_{t-1}) with the updated Θ, then one round of step 1 for Ŵ_t.")
