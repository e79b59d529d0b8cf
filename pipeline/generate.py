"""The model stage: one Idefics2 replica per actor, batched greedy generation with left padding.

`load_processor` / `load_model` are the model card's loading code (`AutoProcessor`,
`AutoModelForImageTextToText.from_pretrained` on a hub id or local path) with the job's dtype,
attention and quantization options. `Idefics2Generator` is the callable class Ray Data's actor pool
runs: preprocessed page rows in, one result row per (page, prompt) out.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import torch

from jobs.spec import ModelSpec
from pipeline.collate import collate_pixels
from pipeline.preprocess import ImageSettings, unpack_crops
from pipeline.prompts import PromptPlan
from pipeline.schema import RESULT_SCHEMA, table_from_rows

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but this worker has no CUDA GPU")
    return requested


def resolve_dtype(requested: str, device: str) -> torch.dtype:
    if requested == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return TORCH_DTYPES[requested]


def load_processor(model_id: str, image_settings: ImageSettings | None = None):
    """The checkpoint's processor on the PIL backend (CPU and GPU nodes preprocess identically).

    Image splitting is set on the image processor itself, not per call: the text expansion of
    `<image>` (64 vs 5x64 tokens) reads that attribute, so a per-call flag would desynchronise them.
    """
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_id, backend="pil")
    if image_settings is not None:
        ip = processor.image_processor
        ip.do_image_splitting = image_settings.do_image_splitting
        ip.size = {"longest_edge": image_settings.longest_edge, "shortest_edge": image_settings.shortest_edge}
    return processor


def load_model(spec: ModelSpec, device: str):
    from transformers import AutoModelForImageTextToText

    dtype = resolve_dtype(spec.dtype, device)
    kwargs = {"dtype": dtype, "attn_implementation": spec.attn_implementation}
    if spec.quantization == "bnb-4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
        kwargs["device_map"] = {"": 0}
    # AWQ checkpoints carry their quantization_config; from_pretrained applies it by itself.
    model = AutoModelForImageTextToText.from_pretrained(spec.id, **kwargs)
    if spec.quantization != "bnb-4bit":
        model.to(device)
    model.eval()
    return model


@dataclass
class Sequence:
    """One (page, prompt) pair waiting for generation."""

    page: dict
    plan: PromptPlan
    crops: list


def _replica_identity() -> tuple[str, str]:
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            actor = ctx.get_actor_id() or ""
            return f"{ctx.get_node_id()[:8]}/{actor[-8:] or os.getpid()}", ctx.get_node_id()
    except Exception:
        pass
    return f"{socket.gethostname()}/{os.getpid()}", socket.gethostname()


class Idefics2Generator:
    """Ray Data actor: preprocessed page rows -> result rows, one per (page, prompt plan)."""

    def __init__(
        self,
        model_spec: ModelSpec,
        image_settings: ImageSettings,
        plans: list[PromptPlan],
        run_id: str = "",
        batch_size: int = 8,
        max_batch_pixels: int = 0,
    ):
        self.spec = model_spec
        self.settings = image_settings
        self.plans = plans
        self.run_id = run_id
        self.batch_size = batch_size
        self.max_batch_pixels = max_batch_pixels
        self.device = resolve_device(model_spec.device)
        self.dtype = resolve_dtype(model_spec.dtype, self.device)
        self.processor = load_processor(model_spec.id, image_settings)
        self.tokenizer = self.processor.tokenizer
        self.model = load_model(model_spec, self.device)
        n_latents = self.model.config.perceiver_config.resampler_n_latents
        if self.processor.image_seq_len != n_latents:
            raise ValueError(f"processor image_seq_len={self.processor.image_seq_len} != perceiver latents {n_latents}")
        self.replica, self.node = _replica_identity()
        self._prompt_ids: dict[str, torch.Tensor] = {}

    # -- per batch --------------------------------------------------------------------------------
    def __call__(self, pages: pa.Table) -> Iterator[pa.Table]:
        rows, sequences = [], []
        for page in pages.to_pylist():
            if page["status"] != "ok":
                rows.extend(self._error_row(page, plan, page["error"], page["stage"]) for plan in self.plans)
                continue
            crops = unpack_crops(page.pop("pixels"), page.pop("crop_shapes"))
            sequences.extend(Sequence(page, plan, crops) for plan in self.plans)
        for group in self._batches(sequences):
            rows.extend(self._generate_or_split(group))
        yield table_from_rows(rows, RESULT_SCHEMA)

    def _batches(self, sequences: list[Sequence]) -> Iterator[list[Sequence]]:
        """Group by prompt and generation settings, then by crop shape, then cut by count and pixel budget.

        Sequences in one batch share their prompt (so text needs no padding at all) and have similar
        crop sizes (so little pixel padding).
        """
        by_key: dict[tuple, list[Sequence]] = {}
        for seq in sequences:
            by_key.setdefault(seq.plan.generation_key, []).append(seq)
        for group in by_key.values():
            group.sort(key=lambda s: (len(s.crops), max(c.shape[0] for c in s.crops), max(c.shape[1] for c in s.crops)))
            batch, pixels = [], 0
            for seq in group:
                seq_pixels = sum(c.shape[0] * c.shape[1] for c in seq.crops)
                full = len(batch) >= self.batch_size or (
                    self.max_batch_pixels and batch and pixels + seq_pixels > self.max_batch_pixels
                )
                if full:
                    yield batch
                    batch, pixels = [], 0
                batch.append(seq)
                pixels += seq_pixels
            if batch:
                yield batch

    def _generate_or_split(self, batch: list[Sequence]) -> list[dict]:
        """Generate for a batch; if it fails, halve it until the failing page is alone and record it."""
        try:
            return self._generate(batch)
        except Exception as exc:  # OOM, CUDA errors, a malformed page: isolate the culprit
            if self.device == "cuda":
                torch.cuda.empty_cache()
            if len(batch) == 1:
                seq = batch[0]
                return [self._error_row(seq.page, seq.plan, f"generate failed: {type(exc).__name__}: {exc}", "generate")]
            middle = len(batch) // 2
            return self._generate_or_split(batch[:middle]) + self._generate_or_split(batch[middle:])

    def prompt_ids(self, prompt: str) -> torch.Tensor:
        """Token ids of a prompt with `<image>` expanded, exactly as the processor tokenizes it."""
        if prompt not in self._prompt_ids:
            encoded = self.processor(text=prompt, return_tensors="pt")
            self._prompt_ids[prompt] = encoded["input_ids"][0]
        return self._prompt_ids[prompt]

    @torch.inference_mode()
    def _generate(self, batch: list[Sequence]) -> list[dict]:
        plan = batch[0].plan
        ids = self.prompt_ids(plan.prompt)
        input_ids = ids.unsqueeze(0).expand(len(batch), -1).to(self.device)
        attention_mask = torch.ones_like(input_ids)
        pixel_values, pixel_mask = collate_pixels([s.crops for s in batch], self.settings, self.device, self.dtype)
        generation = dict(max_new_tokens=plan.max_new_tokens, do_sample=plan.do_sample)
        if plan.do_sample:
            generation.update(temperature=plan.temperature, top_p=plan.top_p)
        if plan.repetition_penalty != 1.0:
            generation["repetition_penalty"] = plan.repetition_penalty
        if plan.stop_strings:
            generation.update(stop_strings=list(plan.stop_strings), tokenizer=self.tokenizer)
        started = time.perf_counter()
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            pixel_attention_mask=pixel_mask,
            pad_token_id=self.tokenizer.pad_token_id,
            **generation,
        )
        elapsed = time.perf_counter() - started
        new_tokens = output[:, input_ids.shape[1]:].cpu()
        eos_ids = set(_as_list(self.model.generation_config.eos_token_id))
        rows = []
        for seq, tokens in zip(batch, new_tokens.tolist()):
            n_out, finished = len(tokens), False
            for position, token in enumerate(tokens):
                if token in eos_ids:
                    n_out, finished = position + 1, True
                    break
            # After a sequence finishes, generate pads it; count and decode only what it produced.
            text = self.tokenizer.decode(tokens[:n_out], skip_special_tokens=True).strip()
            truncated = not finished and n_out >= plan.max_new_tokens
            rows.append(
                self._row(seq.page, plan, status="ok", text=text, n_input_tokens=len(ids), n_output_tokens=n_out,
                          truncated=truncated, route="model", generate_s=elapsed / len(batch))
            )
        return rows

    # -- rows ----------------------------------------------------------------------------------------
    def _row(self, page: dict, plan: PromptPlan, **values) -> dict:
        return {
            "source_uri": page["source_uri"],
            "page": page["page"],
            "n_pages": page.get("n_pages"),
            "task": plan.task,
            "question": plan.question,
            "prompt": plan.prompt,
            "model": self.spec.id,
            "max_new_tokens": plan.max_new_tokens,
            "width": page.get("width"),
            "height": page.get("height"),
            "source_size": page.get("size"),
            "source_etag": page.get("etag"),
            "run_id": self.run_id,
            "replica": self.replica,
            "node": self.node,
            **values,
        }

    def _error_row(self, page: dict, plan: PromptPlan, error: str, stage: str) -> dict:
        return self._row(page, plan, status="error", error=error, stage=stage, text=None, route=None)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
