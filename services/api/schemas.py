"""Typed request and response bodies of the JSON API (they also make the OpenAPI page)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from services.config import SETTINGS


def texts_schema(description: str) -> dict:
    """Field arguments for a list of texts: the limits the service enforces (with its own
    messages, services/service.py check_texts), stated in the OpenAPI document."""
    return {"description": description, "json_schema_extra": {
        "minItems": 1, "maxItems": SETTINGS.max_texts_per_request,
        "items": {"type": "string", "minLength": 1, "maxLength": SETTINGS.max_text_chars, "pattern": r"\S"}}}


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr = Field(description="bundle name, e.g. kim-cnn-trec6 (see GET /models)")
    texts: list[StrictStr] = Field(**texts_schema("texts to classify, one result each, in order"))
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
    kind: str = Field(description="classifier (/classify, /explain), language model (/lm/*) or image classifier (/classify-image)")
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
    texts: list[StrictStr] = Field(**texts_schema("texts to explain, one result each, in order"))
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


# --------------------------------------------------------------------------- language model


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr = Field(description="a language-model bundle, e.g. char-lm-small-ptb")
    texts: list[StrictStr] = Field(**texts_schema("texts to score, each read as one sentence after a sentence boundary"))


class TokenScore(BaseModel):
    token: str
    log_prob: float = Field(description="natural log of P(token | the tokens before it)")
    in_vocabulary: bool = Field(description="false: scored as <unk>, the class of every word outside the vocabulary")


class TextScore(BaseModel):
    tokens: list[TokenScore] = Field(description="the text as the model read it (Penn Treebank conventions), ending with <eos>")
    log_prob: float = Field(description="sum of the tokens' log-probabilities")
    perplexity: float = Field(description="exp(-log_prob / number of tokens)")


class ScoreResponse(BaseModel):
    model: str
    results: list[TextScore]


class NextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    prefix: StrictStr = Field(description="text so far (may be empty: the start of a sentence)")
    top_k: StrictInt | None = Field(default=None, description="how many next words (default 10, at most 100)")


class WordProbability(BaseModel):
    word: str
    probability: float


class NextResponse(BaseModel):
    model: str
    prefix_tokens: list[str]
    next: list[WordProbability]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    prefix: StrictStr = Field(default="", description="text to continue")
    max_words: StrictInt = Field(default=20, description="words to generate (1 to TEXTSERVE_MAX_GENERATE_WORDS)")
    temperature: StrictFloat | StrictInt = Field(default=1.0, description="0 = greedy; higher = more random (at most 10)")
    top_k: StrictInt = Field(default=0, description="sample among the k most probable words; 0 = all")
    seed: StrictInt = Field(default=0, description="the same seed and inputs give the same words")
    stop_at_eos: StrictBool = Field(default=False, description="stop after generating <eos> (a sentence end)")
    stream: StrictBool = Field(default=False, description="answer as server-sent events, one per word")


class GenerateResponse(BaseModel):
    model: str
    prefix_tokens: list[str]
    words: list[WordProbability] = Field(description="each word with its probability under the sampling distribution")
    text: str = Field(description="the generated words joined by spaces")


class WordsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    words: list[StrictStr] = Field(description="any strings, in the vocabulary or not")
    layer: Literal["highway", "cnn"] = Field(default="highway", description="after (highway) or before (cnn) the highway layers")


class NeighborsRequest(WordsRequest):
    top_k: StrictInt | None = Field(default=None, description="neighbours per word (default 10)")


class WordVector(BaseModel):
    word: str
    in_vocabulary: bool
    vector: list[float]


class VectorsResponse(BaseModel):
    model: str
    layer: str
    results: list[WordVector]


class Neighbor(BaseModel):
    word: str
    cosine: float


class WordNeighbors(BaseModel):
    word: str
    in_vocabulary: bool
    neighbors: list[Neighbor]


class NeighborsResponse(BaseModel):
    model: str
    layer: str
    results: list[WordNeighbors]
