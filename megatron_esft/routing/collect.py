"""The scoring pass end to end: load a converted checkpoint, sample the task data, collect, write scores.json.

Sampling (paper §3.3: a 131,072-token random subset of the training set): the task's JSONL is tokenized with the ESFT
template (every token counts, prompt included, as in the official scoring), shuffled with `seed`, and packed into
`seq_length` samples with per-document attention masks and positions, so every token routes exactly as it would in
its document alone (the official script ran one unpadded sample at a time). Samples are taken in order until
`max_tokens` real tokens; the last sample is cut at exactly `max_tokens` (later positions are computed but not
counted, and a causal model's earlier tokens do not depend on them). Padding never counts.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from megatron_esft.errors import UserError


@dataclasses.dataclass
class CollectionPlan:
    micro_batches: list[dict]  # global list; each dict: tokens, position_ids, document_ids, valid [b, s]
    tokens: int  # real tokens that will be counted
    documents: int  # documents touched
    available_tokens: int  # real tokens in the whole dataset


def plan_micro_batches(dataset, max_tokens: int, micro_batch_size: int) -> CollectionPlan:
    """Samples of the dataset's first (shuffled) epoch until `max_tokens` real tokens, grouped into micro-batches."""
    from megatron_esft.data.packing import collate, empty_sample, valid_token_mask

    if max_tokens <= 0:
        raise UserError(f"--max-tokens must be positive, got {max_tokens}")
    samples, total, docs = [], 0, set()
    for index in range(len(dataset)):
        sample = dict(dataset[index])
        valid = valid_token_mask(sample)
        room = max_tokens - total
        if int(valid.sum()) > room:
            valid = valid & (torch.cumsum(valid.long(), 0) <= room)
        sample["valid"] = valid
        samples.append(sample)
        docs.update(int(d) for d in sample["document_ids"][valid].unique())
        total += int(valid.sum())
        if total >= max_tokens:
            break
    while len(samples) % micro_batch_size:
        filler = dict(empty_sample(dataset.seq_length, dataset.pad_id))
        filler["valid"] = torch.zeros(dataset.seq_length, dtype=torch.bool)
        samples.append(filler)
    keys = ("tokens", "position_ids", "document_ids", "valid")
    batches = [collate([{k: s[k] for k in keys} for s in samples[i:i + micro_batch_size]])
               for i in range(0, len(samples), micro_batch_size)]
    return CollectionPlan(batches, total, len(docs), dataset.num_tokens)


@dataclasses.dataclass
class CollectArgs:
    load: str
    data: list[str]
    out: str
    tokenizer: str | None = None
    max_tokens: int = 131072
    seq_length: int = 4096
    micro_batch_size: int = 1
    seed: int = 1234
    template: str = "esft"
    gate: str = "raw"
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    decoder_first_pipeline_num_layers: int | None = None
    decoder_last_pipeline_num_layers: int | None = None
    dtype: str | None = None  # default: the checkpoint's
    tensorboard_dir: str | None = None
    plot: bool = True
    progress: bool = True


def collect_expert_scores(args: CollectArgs):
    """Run the scoring pass on every rank; rank 0 writes `out/scores.json` (+ heatmap). Returns the scores."""
    from megatron.core import parallel_state

    from megatron_esft import parallel as par
    from megatron_esft.checkpoint.convert import load_model_weights
    from megatron_esft.checkpoint.mcore_checkpoint import HF_ASSETS, read_meta, read_tracker
    from megatron_esft.data import build_sft_datasets, load_tokenizer
    from megatron_esft.models.hf_config import parse_hf_config
    from megatron_esft.models.provider import build_model, check_parallel_layout
    from megatron_esft.routing.collector import RoutingStatsCollector
    from megatron_esft.routing.forward import forward_only, shard_for_data_parallel_rank

    iteration = read_tracker(args.load)
    meta = read_meta(args.load, iteration)
    cfg = parse_hf_config(meta["hf_config"], source=f"--load {args.load}")
    tokenizer_dir = args.tokenizer or os.path.join(args.load, HF_ASSETS)
    tokenizer = load_tokenizer(tokenizer_dir)
    dtype = getattr(torch, args.dtype or meta.get("params_dtype") or "float32")

    parallel = par.ParallelConfig.from_args(args, sequence_parallel=args.tensor_model_parallel_size > 1)
    check_parallel_layout(cfg, parallel)
    par.initialize(parallel, seed=args.seed)
    dataset, _ = build_sft_datasets(args.data, tokenizer=tokenizer, seq_length=args.seq_length, pack=True,
                                    seed=args.seed, template=args.template)
    plan = plan_micro_batches(dataset, args.max_tokens, args.micro_batch_size)
    if plan.tokens < args.max_tokens:
        par.print_rank0(f"note: the data has only {plan.tokens} tokens (--max-tokens {args.max_tokens}); using all")

    model = build_model(cfg, parallel, params_dtype=dtype)
    load_model_weights(model, args.load, iteration)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    mine = shard_for_data_parallel_rank(plan.micro_batches, dp_rank, dp_size)

    bar = None
    if args.progress and par.is_rank0():
        from tqdm import tqdm

        bar = tqdm(total=plan.tokens, unit="tok", desc="routing statistics", unit_scale=True, dynamic_ncols=True)

    def progress(batch):
        if bar is not None:
            bar.update(int(batch["valid"].sum()) * dp_size)  # ranks advance in lockstep

    with RoutingStatsCollector(model, gate=args.gate) as collector:
        forward_only([model], mine, on_micro_batch=lambda b: collector.set_valid_mask(b["valid"]), progress=progress)
    if bar is not None:
        bar.n = plan.tokens
        bar.close()
    model_info = {
        "load": os.path.abspath(args.load), "iteration": iteration, "arch": cfg.arch,
        "num_layers": cfg.num_layers, "moe_layers": [str(k) for k in cfg.moe_layers],
        "num_experts": cfg.n_routed_experts, "topk": cfg.num_experts_per_tok, "score_function": cfg.score_function,
        "summary": cfg.summary(),
    }
    data_info = {
        "files": [os.path.abspath(p) for p in args.data], "tokenizer": os.path.abspath(tokenizer_dir),
        "template": args.template, "seed": args.seed, "seq_length": args.seq_length, "max_tokens": args.max_tokens,
        "tokens": plan.tokens, "documents": plan.documents, "available_tokens": plan.available_tokens,
        "parallel": {"tp": parallel.tp, "pp": parallel.pp, "ep": parallel.ep, "dp": dp_size},
    }
    scores = collector.reduce(model=model_info, data=data_info)
    if par.is_rank0():
        os.makedirs(args.out, exist_ok=True)
        path = scores.save(args.out)
        if args.plot:
            from megatron_esft.routing.plot import save_heatmap
            from megatron_esft.routing.selection import select_top_p

            save_heatmap(os.path.join(args.out, "scores_token.png"), scores, "token",
                         select_top_p(scores, "token", 0.2))
        if args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            from megatron_esft.routing.plot import log_heatmap
            from megatron_esft.routing.selection import select_top_p

            writer = SummaryWriter(args.tensorboard_dir)
            for method, p in (("token", 0.2), ("gate", 0.1)):
                log_heatmap(writer, f"expert_scores/{method}", scores, method, select_top_p(scores, method, p))
            writer.close()
        print(f"collected routing statistics over {plan.tokens} tokens ({plan.documents} documents, "
              f"{len(scores.layers)} MoE layers) -> {path}", flush=True)
    return scores
