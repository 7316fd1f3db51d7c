"""GGUF (llama.cpp) variants of the merged model: export, quantization and timing.

The merged model (the trained adapter folded into the base with ``merge_and_unload``) is
written as an F32 GGUF file by the ``gguf`` library's writer, with llama.cpp's tensor names
from the same library; llama.cpp's own quantizer (``llama_model_quantize``, what the
``llama-quantize`` tool runs) turns it into Q4_0 or Q8_0; llama-cpp-python loads and runs
the result on the CPU.

Prompts are tokenized, and generations decoded, by the model's own Hugging Face tokenizer,
exactly as for the transformers variants; the vocabulary in the file is there so that
llama.cpp loads it and prints its tokens, and llama.cpp's tokenizer never sees text.

Only Llama-architecture checkpoints are exported (``model_type == "llama"``: the embedded
``tiny-llama`` and hub Llama models). Both packages come with the ``gguf`` extra; without
it the ``gguf`` bench cases are skipped with :data:`INSTALL_HINT`.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lorabench.case_kinds import CaseKind, register
from lorabench.errors import LorabenchError
from lorabench.kinds.inference import (
    DRIFT_NEW_TOKENS,
    GGUF_VARIANTS,
    GenerationTiming,
    GGUFVariant,
    InferenceParams,
    InferenceRun,
    columns,
    timing_from_stamps,
)
from lorabench.kinds.protocol import ResolvedCase
from lorabench.meters.footprint import MIB

# Deferred imports: torch inside the functions that use them: what only reads a configuration or a stored run
# starts without them; gguf (the gguf/real extras), llama_cpp (the gguf extra) where needed: optional.

INSTALL_HINT = 'pip install "lorabench[gguf]"  (llama-cpp-python compiles llama.cpp: about 7.5 minutes on 2 cores)'
REQUIRED_MODULES = ("llama_cpp", "gguf")
EXPORTABLE_MODEL_TYPES = ("llama",)
# llama_ftype values of llama.h (LLAMA_FTYPE_MOSTLY_*): the quantizer's target for the 2-D weights
FILE_TYPES = {"Q4_0": 2, "Q8_0": 7}


class GGUFError(LorabenchError):
    """The model cannot be exported to GGUF, or llama.cpp refused the file."""


def missing_modules() -> list[str]:
    """The modules of the ``gguf`` extra that cannot be imported here."""
    return [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]


def skip_reason() -> str | None:
    """Why the GGUF cases cannot run here (naming the missing modules and the install command), or ``None``."""
    missing = missing_modules()
    if missing:
        return f"the gguf extra is not installed (no {', '.join(missing)}): {INSTALL_HINT}"
    return None


# The runner of the GGUF variants. Their records are inference records (``config["kind"]`` says
# ``inference``: one summary table, the inference kind's ids and rules), so this registers the runner alone.
KIND = register(CaseKind("gguf", case_ids=tuple, columns=columns, wildcard_rules=False,
                         runner="lorabench.kinds.gguf:GGUFRun"))


@dataclass(frozen=True)
class GGUFParams(InferenceParams):
    """A GGUF case beside its model: :class:`lorabench.kinds.inference.InferenceParams` and the exported file.

    Args:
        f32_path: the merged model exported as F32 GGUF (:func:`export_gguf`); the case quantizes it.
        threads: llama.cpp's threads.
    """

    f32_path: str = ""
    threads: int = 1


def _permute_for_rope(weight, n_head: int):
    """Reorder the rows of a q or k projection from Hugging Face's rotary layout (halves) to
    llama.cpp's (interleaved pairs), as llama.cpp's convert_hf_to_gguf.py does for Llama."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise GGUFError(f"rope_type {rope_type!r} is not exported to GGUF here; only 'default' rotary embeddings are")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise GGUFError("the model config names no rope_theta")
    return float(theta)


def _vocabulary(tokenizer, vocab_size: int, tokenizer_dir: Path):
    """Tokens, token types and merges for a GPT-2-style (byte-level BPE) vocabulary.

    A byte-level BPE tokenizer's tokens and merges are written as they are. Any other
    tokenizer's tokens are re-encoded to byte-level form, so llama.cpp prints them right,
    with one placeholder merge: llama.cpp requires the key, the writer refuses an empty list,
    and llama.cpp's tokenizer is never run on text here.
    """
    import gguf
    from gguf.vocab import bytes_to_unicode

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    byte_level = (backend.get("decoder") or {}).get("type") == "ByteLevel"
    byte_encoder = bytes_to_unicode()
    special = set(tokenizer.all_special_ids)
    tokens, types = [], []
    for token_id in range(vocab_size):
        text = tokenizer.convert_ids_to_tokens(token_id) if token_id < len(tokenizer) else None
        if text is None:  # the embedding matrix is larger than the tokenizer: unused rows
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        elif token_id in special:
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL)
        else:
            tokens.append(text if byte_level else "".join(byte_encoder[b] for b in text.encode("utf-8")))
            types.append(gguf.TokenType.NORMAL)
    merges = gguf.SpecialVocab(tokenizer_dir, load_merges=True).merges if byte_level else []
    if not merges:
        normal = [t for t, k in zip(tokens, types) if k == gguf.TokenType.NORMAL]
        merges = [f"{normal[0]} {normal[1]}"]
    return tokens, types, merges


def export_gguf(model, tokenizer, path: str | Path) -> Path:
    """Write a merged Hugging Face Llama model as an F32 GGUF file.

    Raises:
        GGUFError: the architecture or its rotary embedding is not one exported here.
    """
    import gguf
    import torch

    config = model.config
    if config.model_type not in EXPORTABLE_MODEL_TYPES:
        raise GGUFError(f"model_type {config.model_type!r} is not exported to GGUF here; exported: "
                        f"{', '.join(EXPORTABLE_MODEL_TYPES)} (for others use llama.cpp's convert_hf_to_gguf.py)")
    path = Path(path)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    state = model.state_dict()
    vocab_size = state["model.embed_tokens.weight"].shape[0]

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    with tempfile.TemporaryDirectory() as tokenizer_dir:
        tokenizer.save_pretrained(tokenizer_dir)
        tokens, types, merges = _vocabulary(tokenizer, vocab_size, Path(tokenizer_dir))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when output is absent
    for hf_name, tensor in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFError(f"tensor {hf_name!r} has no llama.cpp name for a Llama model")
        data = tensor.detach().to(torch.float32)
        if hf_name.endswith("q_proj.weight"):
            data = _permute_for_rope(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute_for_rope(data, n_kv)
        writer.add_tensor(name, data.cpu().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def quantize_gguf(source: str | Path, target: str | Path, quant: str, threads: int) -> Path:
    """Quantize an F32 GGUF file with llama.cpp's quantizer (``llama-quantize``'s defaults for ``quant``).

    Raises:
        GGUFError: ``quant`` is not a known type, or llama.cpp failed.
    """

    import llama_cpp

    if quant not in FILE_TYPES:
        raise GGUFError(f"unknown GGUF quantization {quant!r}; known: {', '.join(FILE_TYPES)}")
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FILE_TYPES[quant]
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise GGUFError(f"llama.cpp could not quantize {source} to {quant}")
    return Path(target)


class GGUFRun(InferenceRun):
    """One GGUF variant timed like the transformers variants (:class:`lorabench.kinds.inference.InferenceRun`).

    Loading quantizes the exported F32 file and opens it with llama-cpp-python; each timed
    call starts from an empty context (no prompt cache), generates greedily, and stamps each
    token as the generator yields it.

    Args:
        case: the resolved case: ``params`` a :class:`GGUFParams`, ``data`` the model's Hugging Face
            tokenizer; no configuration (the file's quantization type is the variant's).
    """

    load_source = "wall clock: llama.cpp quantization of the exported F32 file, then loading the result"

    @classmethod
    def data(cls, case: ResolvedCase):
        raise GGUFError(f"{case.case_id}: a GGUF case needs the model's tokenizer as its data (tokenizer_for)")

    def __init__(self, case: ResolvedCase) -> None:
        super().__init__(case)
        params = case.params
        self.f32_path, self.threads = Path(params.f32_path), params.threads
        self.result.config.update({"runtime": "llama.cpp (llama-cpp-python)", "threads": params.threads})
        self.prompt_ids: list[int] = []
        self.gguf_path = self.f32_path.with_name(f"{self.variant.id}.gguf")  # the quantized file

    def _dtype(self) -> str:
        return self.variant.quant  # the file's quantization type

    def load(self):
        from llama_cpp import Llama

        quantize_gguf(self.f32_path, self.gguf_path, self.variant.quant, self.threads)
        return Llama(str(self.gguf_path), n_ctx=512, n_threads=self.threads, n_threads_batch=self.threads, seed=0,
                     verbose=False)

    def record_size(self) -> None:
        self.result.set("weights_mib", self.gguf_path.stat().st_size / MIB, source="bytes of the quantized GGUF file")

    def encode_prompt(self) -> None:
        self.prompt_ids = self.tokenizer(self.prompt)["input_ids"]

    def _greedy(self, prompt_ids: list[int]):
        """Greedy tokens after ``prompt_ids``, endlessly (the caller stops), from an empty context:
        otherwise llama-cpp-python reuses the cached prompt and skips the prefill."""
        self.model.reset()
        return self.model.generate(prompt_ids, temp=0.0, repeat_penalty=1.0)

    def timed_call(self) -> GenerationTiming:
        stamps: list[float] = []
        started = time.perf_counter()
        for _ in self._greedy(self.prompt_ids):
            stamps.append(time.perf_counter())
            if len(stamps) == self.new_tokens:
                break
        return timing_from_stamps(started, stamps, time.perf_counter())

    def generations(self, prompts: list[str], max_new_tokens: int = DRIFT_NEW_TOKENS) -> list[str]:
        out = []
        eos = self.tokenizer.eos_token_id
        for prompt in prompts:
            ids: list[int] = []
            for token in self._greedy(self.tokenizer(prompt)["input_ids"]):
                if token == eos:
                    break
                ids.append(token)
                if len(ids) == max_new_tokens:
                    break
            out.append(self.tokenizer.decode(ids, skip_special_tokens=True))
        return out

    def close(self) -> None:
        if self.model is not None:
            self.model.close()
        super().close()
