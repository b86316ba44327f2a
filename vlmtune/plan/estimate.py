"""Peak accelerator memory of one training step, from formulas (used by `vlmtune plan`).

    estimate(summary, Trainable.of(summary, config.train, config.lora), setup) -> Estimate

Memory of a step = what lives across steps + what the step adds at its highest point:

    peak = weights + optimizer state + batch
           + max over the moments of the step of (activations kept for backward + gradients + transient)

Every term counts tensor bytes that the transformers 5 / peft / PyTorch code allocates, read op by
op from that code (autograd's saved tensors, checked with `torch.autograd.graph.saved_tensors_hooks`);
none is fitted to a measurement. The sums were then compared with measured CPU peaks
(`tests/peak_memory.py`; tests/test_plan.py, bench/plan_validation.py: within a few percent).
Notation: T tokens in the batch (batch_size x max_length: every sample padded to the longest one
allowed), P vision positions (patches) in the batch, h hidden width, q and kv the query and
key/value widths, i MLP width, V vocabulary, e bytes of an activation (2 for bf16/fp16, 4 for fp32),
f = 4 (fp32), r LoRA rank. Widths are per position: a term "e*h" means e*h*T bytes for the batch.

Persistent
- Weights: every parameter at the model dtype. LoRA adds r*(in + out) per adapted linear layer, in
  fp32 (peft's autocast_adapter_dtype casts 16-bit adapters up; DeepSpeed casts them back down);
  DoRA adds its magnitude vector. A part trained fully beside LoRA (unfrozen vision tower or
  projector, lora.modules_to_save) is held twice: peft keeps the frozen original next to the
  trained copy. QLoRA: every nn.Linear weight but lm_head in NF4 with double quantization (0.5
  byte + about 1/64 byte of scales per weight); peft's prepare_model_for_kbit_training casts every
  other parameter to fp32.
- Optimizer: AdamW keeps two moments per trainable parameter in that parameter's dtype (torch's
  fused AdamW, the Trainer's default: no temporaries in the step). Under DeepSpeed the engine keeps
  fp32 master weights and fp32 moments (12 bytes per trainable parameter), split over the GPUs
  from ZeRO-1 on, on the CPU with offload_optimizer.
- Batch: input ids, labels, attention mask and token types (int64) and fp32 pixel values. On the
  CPU twice that: accelerate's DataLoader wrapper fetches the next batch ahead (on a GPU that one
  waits in host memory).

Activations kept for backward, per block and position, where gradients flow (a frozen vision
tower feeding a frozen projector keeps nothing):
- each of the two norms keeps its input: RMSNorm its fp32 copy (f*h; in fp32 the input itself),
  LayerNorm the input (e*h; f*h under CUDA autocast, which runs layer_norm in fp32) and its
  statistics; an RMSNorm whose weight trains also keeps the normalized value (e*h);
- a linear layer keeps its input when its weight trains; q/k/v (and gate/up) share one input;
- a LoRA layer keeps its own copy of its input: with 16-bit activations, peft casts the input to the
  fp32 adapter and autocast casts it back, and that copy is kept (e*in); in fp32 the input itself
  (shared) or, with dropout, the dropout output (f*in); dropout also keeps its mask (1 byte per
  value on CUDA, a fp32 noise tensor on the CPU); plus lora_A's output (e*r). DoRA also keeps the
  base and LoRA outputs for the magnitude's gradient (2*e*out; DoRA's transient weight products
  are not counted);
- attention (SDPA or flash-attention: no seq x seq matrix): rotated q (e*q), k and v (e*kv each;
  e*q when transformers repeats grouped kv heads: eager attention, or SDPA with a padding mask; a
  fused qkv projection keeps its whole output alive through v), the output (e*q), the softmax
  log-sum-exp (f per head). SDPA turns a padded batch's bool mask into an additive one in every
  layer (e*seq per token). Eager attention adds the probabilities, fp32 and e, heads*seq^2 per
  sequence. Qwen vision towers without flash-attention attend image by image and concatenate the
  outputs: one more e*q when the output projection keeps its input;
- MLP: SwiGLU keeps gate, silu(gate) and up (3*e*i) plus down's input if it trains; a plain MLP
  keeps fc1's output once (gelu) or twice (quick_gelu: x and sigmoid(1.702x)), plus fc2's input;
- once per batch: rotary cos/sin (2*e*head_dim per token; fp32 in Qwen vision towers), the padding
  mask (1 byte per token pair), the final norm, lm_head's input if lm_head trains, the loss's fp32
  log-softmax (f*V per token; the logits themselves are not kept), a 16-bit copy of the pixel
  values if the vision tower trains; Qwen's patch merger keeps its norm input and 3*e*width per
  patch (1 if only the vision tower behind it trains), MiniCPM's resampler about its input, its
  norm input and 4*e*h per patch (key, value and their projections; approximate);
- with gradient checkpointing (non-reentrant, every block) a block keeps only its input (e*h) and
  recomputes the rest in its backward, one block at a time.

Moments of the step (the largest is the peak)
- backward start: all activations + the loss's gradient (the log-softmax output's gradient and its
  input's, 2*f*V per token, beside the kept output);
- the backward of the top and of the bottom block of the language model (activations fall and
  gradients rise linearly in between, so the two ends bound the rest) and of the top vision block:
  what is still kept + the gradients made so far + the block's recomputed activations (with
  checkpointing) + its transient gradients (three MLP-width and two hidden-width tensors per
  position, or q, k, v's);
- the vision forward when the tower is frozen: nothing kept, but one block's working tensors;
- the optimizer step: all gradients (DeepSpeed ZeRO-1/2 also converts its gradient partition to fp32).
Gradients are in their parameter's dtype and, with gradient accumulation, live through every
micro-batch. Under ZeRO-2/3 each GPU keeps 1/N of them and a reduce bucket (only the bucket when
they go to the CPU). Under ZeRO-3 each GPU keeps 1/N of the weights (none with offload_param) and
gathered copies of the ones in use, up to stage3_max_live_parameters (DeepSpeed's bound, an upper
estimate).

Liger kernels (train.liger_kernel: true): the fused linear cross-entropy keeps the lm_head input's
gradient (e*h) instead of the fp32 log-softmax and works on logits chunk by chunk (about f*h per
token at a time); its RMSNorm keeps the input itself (e*h) and its SwiGLU recomputes silu (2*e*i).

Not validated on a GPU here (this project's machines have none): the 16-bit terms (autocast copies,
fp32 norm copies, bool dropout masks), Liger, QLoRA (its activations are taken as LoRA's) and DeepSpeed.
On CUDA the plan adds an overhead that tensors do not show: the CUDA context and library
workspaces (1 GiB) and the caching allocator's fragmentation (10% of the tensor peak), rules of
thumb. The CPU comparison leaves the overhead out, as the measurement counts tensors only.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmtune.plan.summary import ArchitectureSummary, Stack

GiB = 1024 ** 3
F32 = 4
CUDA_CONTEXT_BYTES = GiB
FRAGMENTATION = 0.10


@dataclass(frozen=True)
class Setup:
    """A training run as the estimate sees it (vlmtune.plan builds it from the run config)."""

    method: str = "lora"  # lora | dora | qlora | full
    dtype_bytes: int = 2  # model weights and activations: 2 (bf16/fp16) or 4 (fp32)
    cuda: bool = True  # CUDA device (overhead term, LayerNorm in fp32 under autocast)
    batch_size: int = 1
    seq_len: int = 2048  # tokens per sample, image tokens included (data.max_length)
    padded: bool = False  # a mask is built: padded batches or packed samples (sdpa/eager: kv heads repeated too)
    images_per_sample: int = 1
    patches_per_image: int = 1024
    sequences_per_image: int = 1  # separate vision attention sequences (MiniCPM: slices)
    gradient_checkpointing: bool = False
    attention: str = "sdpa"  # sdpa | flash_attention_2 | eager
    lora_r: int = 64
    lora_dropout: float = 0.05
    grad_accum: int = 1
    zero_stage: int = 0  # 0: no DeepSpeed
    gpus: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False
    reduce_bucket: int | None = None  # DeepSpeed reduce_bucket_size in elements; None: "auto" (hidden^2)
    max_live_params: int | None = None  # ZeRO-3 stage3_max_live_parameters; None: DeepSpeed's default 1e9
    liger: bool = False  # Liger kernels: fused linear cross-entropy, RMSNorm and SwiGLU
    answer_only_loss: bool = False  # DPO/GRPO: log-softmax over the answer tokens only; the logits' gradient is one e*V per token

    @property
    def autocast(self) -> bool:  # vlmtune trains 16-bit weights under autocast (Trainer bf16/fp16)
        return self.dtype_bytes < F32


@dataclass
class Trainable:
    """Which parameters train, as `vlmtune.tuning.prepare_model` decides (its own functions, run on the meta model)."""

    method: str
    family: object  # vlmtune.models.family.Family
    frozen: set  # frozen parts
    lora_targets: set  # full names of the linear layers that get adapters
    trained_modules: list  # modules trained fully beside LoRA (peft modules_to_save)
    params: dict  # trained base parameters per part (trained copies included)
    adapters: dict  # LoRA / DoRA parameters per part
    copies: int  # parameters held twice (frozen original + trained copy)

    @classmethod
    def of(cls, summary: ArchitectureSummary, train, lora) -> "Trainable":
        """From the run config's `train` and `lora` sections."""
        from vlmtune.errors import ConfigError
        from vlmtune.tuning import PARTS, frozen_parts, lora_target_names, whole_modules

        model, family = summary.model, summary.family
        frozen = frozen_parts(train)
        params = dict.fromkeys((*PARTS, "other"), 0)
        adapters = dict.fromkeys((*PARTS, "other"), 0)
        if train.method == "full":
            if frozen >= set(PARTS):
                raise ConfigError("train.freeze_vision, freeze_projector and freeze_llm are all true: "
                                  "nothing would train")
            for name, p in model.named_parameters():
                if family.part_of(name) not in frozen:
                    params[family.part_of(name)] += p.numel()
            return cls(train.method, family, frozen, set(), [], params, adapters, 0)
        targets = set(lora_target_names(model, family, lora, frozen))
        saved = [n for n, _ in model.named_modules()  # peft matches modules_to_save by name suffix
                 if any(n == t or n.endswith("." + t) for t in lora.modules_to_save)]
        for part in ("vision", "projector"):
            if part not in frozen:
                saved += [m for m in whole_modules(model, family, part) if m not in saved]
        for name in saved:
            for pname, p in model.get_submodule(name).named_parameters():
                params[family.part_of(f"{name}.{pname}")] += p.numel()
        for name in targets:
            layer = model.get_submodule(name)
            count = lora.r * (layer.in_features + layer.out_features)
            adapters[family.part_of(name + ".weight")] += count + (layer.out_features if train.method == "dora" else 0)
        return cls(train.method, family, frozen, targets, saved, params, adapters, sum(params.values()))

    def trains(self, param_name: str) -> bool:
        """Whether the base parameter `param_name` (not an adapter) trains."""
        if self.method == "full":
            return self.family.part_of(param_name) not in self.frozen
        return any(param_name.startswith(m + ".") for m in self.trained_modules)

    def saver(self, linear_name: str) -> str | None:
        """Why a linear layer keeps its input: "weight" (it trains), "lora" (it has an adapter), or None."""
        if self.trains(linear_name + ".weight"):
            return "weight"
        return "lora" if linear_name in self.lora_targets else None

    def count(self, part: str | None = None) -> int:
        parts = [part] if part else list(self.params)
        return sum(self.params[p] + self.adapters[p] for p in parts)


@dataclass
class Estimate:
    """Bytes per component at the peak moment; `total` adds the overhead."""

    weights: int
    optimizer: int
    gradients: int
    activations: int
    transient: int  # loss gradient or one block's working tensors at the peak moment
    batch: int
    overhead: int
    moment: str  # which moment of the step is the peak

    @property
    def tensors(self) -> int:
        """The tensor peak: what `torch.cuda.max_memory_allocated()` (or tests/peak_memory.py on CPU) reports."""
        return self.weights + self.optimizer + self.gradients + self.activations + self.transient + self.batch

    @property
    def total(self) -> int:
        return self.tensors + self.overhead


# --- activations ------------------------------------------------------------------------------

def _input_kept(savers: list, width: int, outs: list[int], setup: Setup, input_kept_already: bool = False) -> int:
    """Bytes per position that linear layers reading one input keep for backward.

    Args:
        savers: each layer's `Trainable.saver` ("weight", "lora" or None).
        width: the input's width; outs: each layer's output width (DoRA keeps outputs).
        input_kept_already: the input itself is kept by something else (the attention output).
    """
    e, shared, private = setup.dtype_bytes, False, 0
    for saver, out in zip(savers, outs):
        if saver == "weight":
            shared = True
        elif saver == "lora":
            dropout = setup.lora_dropout > 0
            if setup.autocast:  # peft casts x to the fp32 adapter, autocast casts it back: that copy is kept
                private += e * width
            elif dropout:
                private += F32 * width  # the dropout output
            else:
                shared = True  # fp32 adapter, fp32 input: the input itself
            # dropout's mask: bool on CUDA (native_dropout); on the CPU a noise tensor of the fp32 adapter input
            private += ((1 if setup.cuda else F32) * width if dropout else 0) + e * setup.lora_r  # + lora_A's output
            if setup.method == "dora":
                private += 2 * e * out
    return (e * width if shared and not input_kept_already else 0) + private


def _norm_input(stack_rms: bool, width: int, setup: Setup) -> int:
    """Bytes per position a norm keeps of its input (and statistics)."""
    if stack_rms and setup.liger:
        return setup.dtype_bytes * width + F32  # Liger's RMSNorm keeps the input itself and 1/rms
    if stack_rms:
        return F32 * width + F32  # the fp32 copy it computes in (the input itself in fp32) and 1/rms
    return (F32 if setup.autocast and setup.cuda else setup.dtype_bytes) * width + 2 * F32  # input, mean, 1/std


def block_activations(stack: Stack, trainable: Trainable, setup: Setup, chunked: bool, repeat_kv: bool,
                      input_grad: bool = True) -> int:
    """Bytes per position one block keeps for backward (see the module docstring).

    Args:
        chunked: attention runs per image and the outputs are concatenated (Qwen vision, no flash-attention).
        repeat_kv: transformers repeats the kv heads (grouped-query attention with a padding mask).
        input_grad: the block's input needs a gradient (false only for a first block fed by frozen embeddings).
    """
    e = setup.dtype_bytes
    h, q, kv, i = stack.hidden, stack.q_dim, stack.kv_dim, stack.intermediate
    names = {role: [f"{stack.block_prefix}.{rel}" for rel in rels] for role, rels in stack.roles.items()}
    saver = {role: [trainable.saver(n) for n in ns] for role, ns in names.items()}
    qkv_outs = [q + 2 * kv] if stack.fused_qkv else [q, kv, kv]
    norm_trains = trainable.trains(f"{stack.block_prefix}.{stack.norms[0]}.weight")

    norm_in = _norm_input(stack.rms_norm, h, setup)
    # LayerNorm (and Liger's RMSNorm) recompute the normalized value from the input and statistics
    norm_kept = e * h if (norm_trains and stack.rms_norm and not setup.liger) else 0
    norms = (norm_in if input_grad or norm_trains else 0) + norm_in + 2 * norm_kept

    k_width = q if repeat_kv else kv
    v_kept = e * (q + 2 * kv) if stack.fused_qkv else e * k_width
    attention = e * q + e * k_width + v_kept + e * q + F32 * stack.heads  # q, k, v, output, log-sum-exp
    if stack.qk_norm:  # Qwen3's per-head RMSNorm of q and k keeps their fp32 copies (and normalized values)
        heads_kv = stack.heads * kv // q
        attention += F32 * (q + kv) + F32 * (stack.heads + heads_kv) + (e * (q + kv) if norm_trains else 0)
    attention += _input_kept(saver["qkv"], h, qkv_outs, setup)
    attention += _input_kept(saver["o"], q, [h], setup, input_kept_already=not chunked)

    # gate, silu(gate), up (Liger's SwiGLU recomputes silu) / fc1's output
    mlp = (2 if setup.liger else 3) * e * i if stack.gated_mlp else stack.act_saves * e * i
    mlp += _input_kept(saver["up"], h, [i] * len(names["up"]), setup)
    mlp += _input_kept(saver["down"], i, [h], setup)
    return norms + attention + mlp


def block_transient(stack: Stack, setup: Setup) -> int:
    """Bytes per position of the gradients alive inside one block's backward, beyond what it keeps:
    three MLP-width tensors (e.g. the gradients of down's input, of silu(gate) and of up) and two
    hidden-width ones (the residual stream's gradient, the norm output's), or q, k, v's gradients."""
    mlp = 3 * stack.intermediate + 2 * stack.hidden
    attention = 2 * stack.q_dim + 2 * stack.kv_dim + 2 * stack.hidden
    return setup.dtype_bytes * max(mlp, attention)


def eager_scores(heads: int, seq: int, sequences: int, setup: Setup) -> int:
    """Eager attention's kept probabilities (the fp32 softmax output and its e copy)."""
    return sequences * heads * seq * seq * (F32 + setup.dtype_bytes) if setup.attention == "eager" else 0


# --- the estimate -----------------------------------------------------------------------------

def _weights(summary: ArchitectureSummary, trainable: Trainable, setup: Setup) -> int:
    e, adapters = setup.dtype_bytes, trainable.count() - sum(trainable.params.values())
    total = sum(p.numel() for p in summary.model.parameters())
    if setup.method != "qlora":
        adapter_bytes = e if setup.zero_stage else F32  # DeepSpeed casts the whole module, adapters included
        return (total + trainable.copies) * e + adapters * adapter_bytes
    from torch import nn

    quantized = sum(m.weight.numel() for n, m in summary.model.named_modules()
                    if isinstance(m, nn.Linear) and not n.endswith("lm_head"))
    return int(quantized * (0.5 + 1 / 64)) + (total - quantized + trainable.copies + adapters) * F32


@dataclass
class _Grads:
    """Gradient bytes by what produces them, in backward order."""

    lm_head: int  # the language model's output layer (first)
    llm_blocks: int  # the language model's blocks and norms
    middle: int  # embeddings, projector
    vision: int  # the vision tower (last)

    @property
    def total(self) -> int:
        return self.lm_head + self.llm_blocks + self.middle + self.vision


def _gradients(summary: ArchitectureSummary, trainable: Trainable, setup: Setup) -> _Grads:
    base = F32 if setup.method == "qlora" else setup.dtype_bytes
    adapter = setup.dtype_bytes if setup.zero_stage else F32
    lm_head = embed = 0
    for name, module in summary.model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or not trainable.trains(f"{name}.weight"):
            continue
        if name.endswith("lm_head"):
            lm_head = weight.numel() * base
        elif name.endswith("embed_tokens") and not _tied(summary):
            embed = weight.numel() * base
    part = {p: trainable.params[p] * base + trainable.adapters[p] * adapter for p in trainable.params}
    return _Grads(lm_head=lm_head, llm_blocks=max(0, part["llm"] - lm_head - embed),
                  middle=embed + part["projector"] + part["other"], vision=part["vision"])


def _tied(summary: ArchitectureSummary) -> bool:
    model = summary.model
    heads = [m for n, m in model.named_modules() if n.endswith("lm_head")]
    embeds = [m for n, m in model.named_modules() if n.endswith("embed_tokens")]
    return bool(heads and embeds and heads[0].weight is embeds[0].weight)


def estimate(summary: ArchitectureSummary, trainable: Trainable, setup: Setup) -> Estimate:
    """The peak tensor memory of one training step on one device, and the moment it happens."""
    e, n = setup.dtype_bytes, max(1, setup.gpus)
    llm, vis = summary.llm, summary.vision
    T = setup.batch_size * setup.seq_len
    P = setup.batch_size * setup.images_per_sample * setup.patches_per_image
    sequences = setup.batch_size * setup.images_per_sample * setup.sequences_per_image
    vision_grad = trainable.count("vision") > 0
    projector_grad = vision_grad or trainable.count("projector") > 0
    gc = setup.gradient_checkpointing

    # persistent: weights, optimizer, batch
    weights = _weights(summary, trainable, setup)
    grads = _gradients(summary, trainable, setup)
    n_train = trainable.count()
    if setup.zero_stage >= 3:  # each GPU holds 1/N, and gathered copies up to stage3_max_live_parameters
        total = sum(p.numel() for p in summary.model.parameters())
        gathered = min(int(setup.max_live_params or 1e9), total) * e
        weights = (0 if setup.offload_params else weights // n) + gathered
    if setup.zero_stage:
        optimizer = 0 if setup.offload_optimizer else 12 * n_train // n  # fp32 master weights + 2 moments
    else:
        optimizer = 2 * grads.total  # two AdamW moments in each parameter's dtype
    batch = 4 * T * 8 + P * summary.patch_values * F32  # ids, mask, labels, token types; fp32 pixels
    if not setup.cuda:  # accelerate's DataLoader fetches the next batch ahead: on the CPU, in "device" memory
        batch *= 2

    # activations kept for backward, by stack
    first_input_grad = projector_grad or trainable.trains(_embed_name(summary) + ".weight")
    # transformers repeats grouped kv heads for eager attention, and for SDPA when a padding mask is given
    repeat = llm.kv_dim < llm.q_dim and (setup.attention == "eager" or setup.padded and setup.attention == "sdpa")
    llm_block = block_activations(llm, trainable, setup, chunked=False, repeat_kv=repeat)
    llm_block = llm_block * T + eager_scores(llm.heads, setup.seq_len, setup.batch_size, setup)
    if setup.padded and setup.attention == "sdpa":  # SDPA turns the bool padding mask into an additive one, per layer
        llm_block += e * T * setup.seq_len
    per_block = e * llm.hidden * T if gc else llm_block
    llm_kept = per_block * llm.layers
    if not gc and not first_input_grad:
        llm_kept -= _norm_input(True, llm.hidden, setup) * T  # block 0's first norm: its input needs no gradient
    mask = T * setup.seq_len if setup.padded and setup.attention != "flash_attention_2" else 0
    llm_extra = 2 * e * (llm.q_dim // llm.heads) * T + mask  # rotary cos/sin, the padding mask
    final_norm = summary.model.get_submodule(_final_norm_name(summary))
    top = _norm_input(True, llm.hidden, setup) * T
    top += e * llm.hidden * T if any(trainable.trains(f"{_final_norm_name(summary)}.{n}") for n, _ in
                                     final_norm.named_parameters()) else 0
    top += e * llm.hidden * T if grads.lm_head and not setup.liger else 0  # lm_head's input
    # the log-softmax output; Liger's fused linear cross-entropy computes the loss and lm_head input's
    # gradient chunk by chunk in the forward and keeps only that gradient
    loss_kept = e * llm.hidden * T if setup.liger else F32 * summary.vocab * T
    loss_grad = F32 * llm.hidden * T if setup.liger else 2 * F32 * summary.vocab * T
    if setup.answer_only_loss:  # vlmtune/rl/losses.py: nothing of vocabulary width kept, one dense logits gradient
        loss_kept, loss_grad = 0, e * summary.vocab * T

    vision_kept = projector_kept = vision_block = 0
    if vision_grad:
        chunked = summary.projector_kind == "merger" and setup.attention != "flash_attention_2"
        vision_block = block_activations(vis, trainable, setup, chunked=chunked, repeat_kv=False) * P
        vision_block += eager_scores(vis.heads, setup.patches_per_image // setup.sequences_per_image, sequences, setup)
        vision_kept = (e * vis.hidden * P if gc else vision_block) * vis.layers
        vision_kept += 2 * F32 * (vis.q_dim // vis.heads) * P  # rotary cos/sin
        vision_kept += P * summary.patch_values * e if e != F32 else 0  # pixels cast for the patch embedding
    if projector_grad:
        projector_trains = trainable.count("projector") > 0
        if summary.projector_kind == "merger":  # norm, then fc1 -> gelu -> fc2 on merge^2 patches per token
            kept = (3 if projector_trains else 1) * e * vis.hidden
            projector_kept = P * (_norm_input(vis.rms_norm, vis.hidden, setup) + kept)
        else:  # resampler: kv_proj's input, ln_kv's input, key (+ position), value, their projections
            projector_kept = P * (e * vis.hidden + _norm_input(False, llm.hidden, setup) + 4 * e * llm.hidden)
    upstream = vision_kept + projector_kept
    everything = llm_kept + llm_extra + top + loss_kept + upstream

    # the moments of the step
    def shard(grad_bytes: int) -> int:
        """Gradient bytes on one device: ZeRO-2/3 keep 1/N and a reduce bucket, only the bucket with offload."""
        if setup.zero_stage < 2:
            return grad_bytes
        bucket = min(grad_bytes, (setup.reduce_bucket or llm.hidden ** 2) * e)
        return bucket if setup.offload_optimizer else grad_bytes // n + bucket

    all_grads = shard(grads.total)
    held = all_grads if setup.grad_accum > 1 else 0  # accumulated gradients live through every micro-batch
    llm_transient = block_transient(llm, setup) * T + (llm_block if gc else 0)
    moments = [
        ("backward start (loss gradient)", everything, held, loss_grad),
        ("backward, top language-model block", everything - top - loss_kept, max(held, shard(grads.lm_head)),
         llm_transient),
        ("backward, bottom language-model block", per_block + llm_extra + upstream,
         max(held, shard(grads.lm_head + grads.llm_blocks)), llm_transient),
        ("optimizer step", 0, all_grads,
         4 * n_train // n if setup.zero_stage in (1, 2) and not setup.offload_optimizer else 0),
    ]
    if vision_grad:
        transient = block_transient(vis, setup) * P + (vision_block if gc else 0)
        moments.append(("backward, top vision block", vision_kept, max(held, shard(grads.total - grads.vision)),
                        transient))
    else:  # nothing kept, but one block's working tensors: qkv, fp32 q and k for rotary, the MLP's
        working = P * (e * (vis.q_dim + 2 * vis.kv_dim + 2 * vis.intermediate) + 2 * F32 * vis.hidden)
        moments.append(("vision forward (frozen tower)", 0, held, working))
    moment, acts, grads_now, transient = max(moments, key=lambda m: m[1] + m[2] + m[3])

    tensors = weights + optimizer + batch + acts + grads_now + transient
    overhead = CUDA_CONTEXT_BYTES + int(FRAGMENTATION * tensors) if setup.cuda else 0
    return Estimate(weights=weights, optimizer=optimizer, gradients=grads_now, activations=acts, transient=transient,
                    batch=batch, overhead=overhead, moment=moment)


def _embed_name(summary: ArchitectureSummary) -> str:
    return next((n for n, _ in summary.model.named_modules() if n.endswith("embed_tokens")), "embed_tokens")


def _final_norm_name(summary: ArchitectureSummary) -> str:
    """The language model's last norm: the `norm` module beside its block list."""
    layers = summary.llm.block_prefix.rsplit(".", 2)[0]  # "model.language_model.layers.0" -> "model.language_model"
    return f"{layers}.norm"


