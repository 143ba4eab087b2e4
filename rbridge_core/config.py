"""Configuration models. Frozen pydantic models with ``extra="forbid"``: a typo is an error."""

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rbridge_core.errors import ConfigError
from rbridge_core.redact import (
    UrlCredentials,
    redact_text,
    redact_url,
    take_credentials,
    url_credentials,
)


class _Frozen(BaseModel):
    # inputs stay out of error texts: a URL given with its credentials must not be echoed
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


def _no_credentials(value):
    """A location (or list of them) must not carry credentials: the config is stored verbatim
    (manifest.json, Prefect's database, artifacts), so they would persist there."""
    for url in [value] if isinstance(value, str) else value or []:
        if url_credentials(url)[1] is not None:
            raise ValueError(
                f"{redact_url(url)} carries credentials in the URL, which would be stored with "
                "the config; give them through the environment (AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY for s3://) or a Prefect block instead ('rbridge rank' "
                "moves them there itself)"
            )
    return value


class ScoringConfig(_Frozen):
    """How a proxy checkpoint is scored against traces (one fused forward pass per batch)."""

    batch_max_tokens: int | None = Field(
        None,
        ge=1,
        description="Padded tokens per forward batch (batch size x longest sequence); default: "
        "4,096 on CPU (larger batches only add cache misses there), 32,768 on CUDA.",
    )
    head_chunk_rows: int = Field(
        256,
        ge=1,
        description="Rows of the output head (scored positions) turned into vocabulary "
        "log-probabilities at once; bounds peak memory at rows x vocab x 4 bytes.",
    )
    max_seq_len_tokens: int | None = Field(
        None, ge=2, description="Context length; default: the model's max_position_embeddings."
    )
    rbridge_last_n_tokens: int | None = Field(
        None, ge=1, description="Score only the last N trace tokens for rBridge/trace NLL (off)."
    )
    stats_last_n_tokens: int | None = Field(
        1000, ge=1, description="Token statistics use the last N solution tokens (paper: 1,000)."
    )
    minmax_scope: Literal["trace", "benchmark"] = Field(
        "trace", description="Scope of the MinMax normalisation of rBridge weights."
    )
    choice_metrics: bool = Field(
        True,
        description="Multiple-choice baselines (option log-likelihoods) for items with choices.",
    )
    compile_statistics: Literal["auto", "on", "off"] = Field(
        "auto",
        description="torch.compile the per-token statistics kernel, fusing its vocabulary-wide "
        "passes (falls back to eager, with a warning, where compilation is unavailable). auto: "
        "only for runs large enough to repay the compile time (rows x vocabulary >= 5e8).",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, float32 on CPU."
    )
    bootstrap_samples: int = Field(1000, ge=0, description="Resamples for item-level CIs.")
    ci_level: float = Field(0.95, gt=0.0, lt=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _check_device_dtype(self) -> "ScoringConfig":
        if self.device == "cpu" and self.dtype == "bfloat16":
            raise ValueError(
                "scoring.dtype='bfloat16' with scoring.device='cpu': bf16 autocast is for CUDA; "
                "use dtype='float32' or 'auto' on CPU"
            )
        return self


class TrainingConfig(BaseModel):
    """How a proxy is trained. Give exactly one of max_steps, train_tokens, tokens_per_param."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_steps: int | None = Field(None, ge=1, description="Optimizer steps.")
    train_tokens: int | None = Field(None, ge=1, description="Token budget (rounded up to steps).")
    tokens_per_param: float | None = Field(
        None, gt=0, description="Token budget as a multiple of the parameters (Chinchilla: 20)."
    )
    seq_len_tokens: int = Field(512, ge=1, description="Tokens per row (inputs; rows carry +1).")
    batch_size: int = Field(8, ge=1, description="Rows per micro-batch, per rank.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(3e-3, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of lr.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decay on 2-D weights only.")
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(1.0, gt=0, description="Max global grad norm; None: off.")
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="Checkpoint interval in steps (always one at the end)."
    )
    keep_last_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    seed: int = 0
    compile: bool = Field(False, description="torch.compile the model (opt-in).")
    log_every_steps: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "TrainingConfig":
        budgets = {
            k: getattr(self, k)
            for k in ("max_steps", "train_tokens", "tokens_per_param")
            if getattr(self, k) is not None
        }
        if len(budgets) != 1:
            raise ValueError(
                f"training: give exactly one of max_steps, train_tokens, tokens_per_param "
                f"(got {budgets or 'none'})"
            )
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"training.betas={self.betas}: each must be in [0, 1)")
        return self

    def tokens_per_step(self, world_size: int = 1) -> int:
        """Tokens consumed by one optimizer step across all ranks."""
        return self.batch_size * self.seq_len_tokens * self.grad_accum_steps * world_size


# --- the ranking run: one model for the CLI, the flows and the Prefect UI form ----------------

ProxyPreset = Literal["tiny", "4M", "20M", "60M", "150M", "300M", "530M", "750M", "1B"]
HEADLINE_METRICS = ("rbridge_nll", "trace_nll", "answer_nll", "top5_acc:token_freq")
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
# A corpus name becomes part of folder names (cache/proxies/<name>-<key>/, task run names): the
# pattern keeps out path separators and characters a filesystem may refuse, the length keeps
# the folder under the 255-byte name limit with room to spare.
CORPUS_NAME_MAX_CHARS = 64


class HubDatasetConfig(_Frozen):
    """A dataset on the Hugging Face hub (or a local folder laid out like one), streamed."""

    name: str = Field(..., min_length=1, description="Dataset id (org/name) or local folder.")
    config: str | None = Field(None, description="Dataset config (subset); default: the default.")
    split: str = Field("train", min_length=1, description="Split to read.")
    revision: str | None = Field(
        None, description="Branch, tag or commit; default: the latest (pin it for reproducibility)."
    )


class CorpusConfig(_Frozen):
    """One candidate corpus: files or folders (local or s3://), or a hub dataset, holding its
    documents."""

    name: str = Field(
        ...,
        pattern=_NAME_PATTERN,
        max_length=CORPUS_NAME_MAX_CHARS,
        description=f"Short unique name (letters, digits, . _ -; at most {CORPUS_NAME_MAX_CHARS}).",
    )
    paths: list[str] = Field(default_factory=list, description="Files or folders; local or s3://.")
    text_field: str = Field("text", description="Text column (Parquet) or field (JSONL).")
    format: Literal["auto", "parquet", "jsonl", "text"] = "auto"
    checkpoints: list[str] = Field(
        default_factory=list,
        description="Existing model folders (HF, local or s3://) to score instead of training, "
        "e.g. a ladder of sizes or steps. Empty: train a proxy on this corpus.",
    )
    hub: HubDatasetConfig | None = Field(
        None,
        description="Instead of paths: a hub dataset's config and split, streamed with "
        "`datasets`; documents are its text_field values.",
    )

    _urls = field_validator("paths", "checkpoints")(_no_credentials)

    @model_validator(mode="after")
    def _check(self) -> "CorpusConfig":
        if not self.paths and not self.checkpoints and self.hub is None:
            raise ValueError(
                f"corpus {self.name!r}: give paths or hub (to train a proxy) or checkpoints "
                "(to score)"
            )
        if self.paths and self.hub is not None:
            raise ValueError(f"corpus {self.name!r}: give paths or hub, not both")
        return self

    def spec(self):
        if self.hub is not None:
            from rbridge_core.hub import HubCorpusSpec

            hub = self.hub
            return HubCorpusSpec(
                self.name, hub.name, hub.config, hub.split, hub.revision, self.text_field
            )
        from rbridge_core.corpora import CorpusSpec

        return CorpusSpec(self.name, tuple(self.paths), self.text_field, self.format)


class TracesConfig(_Frozen):
    """Which reasoning traces the proxies are scored on."""

    benchmarks: list[str] = Field(
        default_factory=list,
        description="Built-in benchmark loaders (gsm8k, gsm8k_gpt4o_mini, math500, humaneval, "
        "arc_challenge, arc_easy, commonsenseqa, commonsenseqa_gpt4o_mini, mmlu_pro_stem).",
    )
    files: list[str] = Field(
        default_factory=list, description="Trace files (Parquet or JSONL), e.g. frontier traces."
    )
    limit_per_benchmark: int | None = Field(
        None, ge=1, description="At most this many items per built-in benchmark."
    )
    data_dir: str | None = Field(
        None,
        description="Full benchmark data laid out like shared/data; 'hf:' reads each benchmark "
        "from its hub dataset (openai/gsm8k, ...), 'hf:FOLDER' from a local mirror of them "
        "(FOLDER/openai/gsm8k, ...); default: the slices shipped with rbridge.",
    )

    _urls = field_validator("files", "data_dir")(_no_credentials)

    @model_validator(mode="after")
    def _check(self) -> "TracesConfig":
        from rbridge_core.benchmarks import BENCHMARK_NAMES

        if not self.benchmarks and not self.files:
            raise ValueError("traces: give at least one of benchmarks or files")
        unknown = [b for b in self.benchmarks if b not in BENCHMARK_NAMES]
        if unknown:
            raise ValueError(
                f"traces.benchmarks: unknown {unknown}; available: {', '.join(BENCHMARK_NAMES)}"
            )
        return self


class ProxyConfig(_Frozen):
    """The proxy trained on every corpus (same tokenizer, shape and recipe for all)."""

    preset: ProxyPreset = Field("tiny", description="Model size on the ladder.")
    tokenizer: str = Field(
        ..., description="tokenizer.json, Hugging Face tokenizer folder or sentencepiece .model."
    )
    training: TrainingConfig = Field(
        default_factory=lambda: TrainingConfig(tokens_per_param=20.0),
        description="TrainingConfig: token budget, batch, LR schedule, checkpoints.",
    )
    max_position_embeddings: int = Field(2048, ge=2, description="Longest context in tokens.")
    repeat_corpus: bool = Field(
        False, description="Train several epochs when a corpus is smaller than the budget."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"

    _urls = field_validator("tokenizer")(_no_credentials)

    def model(self):
        from rbridge_core.models import model_preset

        return model_preset(self.preset, max_position_embeddings=self.max_position_embeddings)


class ExecutionConfig(_Frozen):
    """How the per-corpus work is fanned out."""

    mode: Literal["in_process", "cluster"] = Field(
        "in_process",
        description="in_process: every corpus in this process, max_concurrency at a time. "
        "cluster: one train-and-score flow run per corpus on a work pool (run_deployment).",
    )
    max_concurrency: int = Field(1, ge=1, description="Corpora processed at once (in_process).")
    deployment: str = Field(
        "train-and-score/train-and-score",
        description="cluster mode: the child deployment, as 'flow-name/deployment-name'.",
    )
    strict: bool = Field(False, description="Fail the run if any corpus fails.")
    retries: int = Field(
        2, ge=0, description="Retries of a step after a transient fault (I/O, S3, CUDA OOM)."
    )
    retry_delay_seconds: float = Field(10.0, ge=0, description="Wait before a retry.")
    fingerprint: Literal["cheap", "strong"] = Field(
        "cheap",
        description="Corpus identity for caching. cheap: paths, sizes, ETags or mtimes. "
        "strong: a hash of the content (reads every byte).",
    )


class RankConfig(_Frozen):
    """A corpus ranking: which corpora, which traces, which proxy, where the results go."""

    name: str = Field(
        "ranking",
        pattern=_NAME_PATTERN,
        max_length=CORPUS_NAME_MAX_CHARS,  # run folders: <name>-<UTC time>-<id>
        description=f"Run name prefix (letters, digits, . _ -; at most {CORPUS_NAME_MAX_CHARS}).",
    )
    corpora: list[CorpusConfig] = Field(..., min_length=1)
    traces: TracesConfig
    proxy: ProxyConfig
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    output: str = Field(
        "out/rankings", description="Where run folders are written (local or s3://)."
    )
    cache: str | None = Field(
        None, description="Trained proxies, scores and task results; default: OUTPUT/_cache."
    )
    headline_metrics: list[str] = Field(
        default_factory=lambda: list(HEADLINE_METRICS),
        min_length=1,
        description="Metrics shown in the report and printed ranking (all are computed).",
    )
    targets: str | None = Field(
        None,
        description="Optional targets file (Parquet or CSV: corpus, benchmark, target, ...): a "
        "larger model's results on some corpora. The run then also writes backtest.parquet, "
        "fit.parquet and predictions.parquet, and the report predicts every corpus's target.",
    )

    _urls = field_validator("output", "cache", "targets")(_no_credentials)

    @model_validator(mode="after")
    def _check(self) -> "RankConfig":
        from rbridge_core.metrics import METRICS

        names = [c.name for c in self.corpora]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"corpora: names must be unique; repeated: {duplicates}")
        unknown = [m for m in self.headline_metrics if m not in METRICS]
        if unknown:
            known = ", ".join(list(METRICS)[:12])
            raise ValueError(f"headline_metrics: unknown {unknown}; known include {known}, ...")
        return self

    @property
    def cache_dir(self) -> str:
        from rbridge_core.storage import join

        return self.cache or join(self.output, "_cache")


def load_rank_config(
    path: str | Path,
    overrides: dict | None = None,
    *,
    use_credentials: Callable[[list[UrlCredentials]], None] | None = None,
) -> RankConfig:
    """Read a ``RankConfig`` from YAML. Relative input paths (corpora, checkpoints, trace files,
    data_dir, tokenizer, targets) are taken relative to the YAML file; output and cache to the
    working directory. ``overrides`` replace top-level fields. Errors name the field.

    URLs carrying credentials (``s3://KEY:SECRET@bucket/...``) are refused, unless
    ``use_credentials`` is given: then the credentials are cut out of the URLs and handed to it
    (to put where the filesystem reads them) before the config exists, so it never holds them.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of RankConfig fields")
    data = _resolve_inputs({**data, **(overrides or {})}, path.resolve().parent)
    if use_credentials is not None:
        data, found = take_credentials(data)
        if found:
            use_credentials(found)
    return validate_config(RankConfig, data, where=str(path))


def validate_config(model_cls, data: dict, where: str | None = None):
    """``model_cls(**data)``, turning the first validation error into a ConfigError naming it."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        prefix = f"{where}: " if where else ""
        message = first["msg"].removeprefix("Value error, ")
        field = ".".join(str(p) for p in first["loc"])
        if not field:  # a check across fields: its message names them
            raise ConfigError(f"{prefix}{message}") from None
        value = first.get("input")
        shown = "" if isinstance(value, dict) else f" = {redact_text(repr(value))}"
        raise ConfigError(f"{prefix}config field {field!r}{shown}: {message}") from None


def _resolve(base: Path, value):
    if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
        return str((base / value).resolve())
    return value


def _resolve_inputs(data: dict, base: Path) -> dict:
    data = dict(data)
    corpora = data.get("corpora")
    if isinstance(corpora, list):
        resolved = []
        for corpus in corpora:
            if isinstance(corpus, dict):
                corpus = dict(corpus)
                for key in ("paths", "checkpoints"):
                    if isinstance(corpus.get(key), list):
                        corpus[key] = [_resolve(base, p) for p in corpus[key]]
                hub = corpus.get("hub")
                # a local folder laid out like a hub dataset, named relative to the YAML
                if isinstance(hub, dict) and isinstance(hub.get("name"), str):
                    if (base / hub["name"]).is_dir() and not Path(hub["name"]).is_absolute():
                        corpus["hub"] = {**hub, "name": _resolve(base, hub["name"])}
            resolved.append(corpus)
        data["corpora"] = resolved
    traces = data.get("traces")
    if isinstance(traces, dict):
        traces = dict(traces)
        if isinstance(traces.get("files"), list):
            traces["files"] = [_resolve(base, p) for p in traces["files"]]
        data_dir = traces.get("data_dir")
        if isinstance(data_dir, str) and data_dir.startswith("hf:"):  # hf: or hf:<mirror folder>
            mirror = data_dir[len("hf:") :]
            traces["data_dir"] = "hf:" + (_resolve(base, mirror) if mirror else "")
        elif data_dir:
            traces["data_dir"] = _resolve(base, data_dir)
        data["traces"] = traces
    proxy = data.get("proxy")
    if isinstance(proxy, dict) and proxy.get("tokenizer"):
        data["proxy"] = {**proxy, "tokenizer": _resolve(base, proxy["tokenizer"])}
    if data.get("targets"):
        data["targets"] = _resolve(base, data["targets"])
    return data


DEMO_CONFIG = Path(__file__).parent / "examples" / "demo.yaml"


def demo_config(**overrides) -> RankConfig:
    """The shipped demo ranking (five real corpus slices, GSM8K + CommonsenseQA, tiny proxies)."""
    return load_rank_config(DEMO_CONFIG, overrides)
