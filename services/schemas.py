"""Typed request and response bodies of the JSON API (they also make the OpenAPI page)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr = Field(description="bundle name, e.g. kim-cnn-trec6 (see GET /models)")
    texts: list[StrictStr] = Field(description="texts to classify, one result each, in order")
    top_k: StrictInt | None = Field(default=None, description="how many top labels to list (default 3, at most the label count)")


class LabelProbability(BaseModel):
    label: str
    probability: float


class TextResult(BaseModel):
    label: str = Field(description="the most probable label")
    probabilities: dict[str, float] = Field(description="every label's probability")
    top_k: list[LabelProbability] = Field(description="the k most probable labels, most probable first")


class ClassifyResponse(BaseModel):
    model: str
    results: list[TextResult]


class ModelInfo(BaseModel):
    name: str
    architecture: str
    preset: str
    labels: list[str]
    metrics: dict
    sha256: str = Field(description="sha256 of the bundle's manifest, which pins every file")
    store_tag: str = Field(description="the BentoML model store tag it was loaded from")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr = Field(description="a Kim CNN bundle, e.g. kim-cnn-trec6")
    texts: list[StrictStr]
    top_k: StrictInt | None = Field(default=None, description="n-grams to list per text (default 5, at most 50)")


class NgramEvidence(BaseModel):
    ngram: str = Field(description="the words of the window that won max-over-time pooling")
    start: int = Field(description="index of its first word in the tokenised text")
    width: int = Field(description="filter width (window length in words)")
    contribution: float = Field(description="what the features that picked this window add to the label's logit")
    filters: int = Field(description="how many filters picked this window")


class TextExplanation(BaseModel):
    label: str
    logit: float
    bias: float = Field(description="logit = bias + contributions of every feature")
    ngrams: list[NgramEvidence]
    rest: float = Field(description="contributions of the windows not listed")


class ExplainResponse(BaseModel):
    model: str
    results: list[TextExplanation]
