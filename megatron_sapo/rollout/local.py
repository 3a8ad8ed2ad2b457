"""In-process rollouts with Hugging Face transformers on the trainer's exported weights.

The default engine when SGLang is not installed (laptops, CPU CI, debugging). It runs the same HF
architecture that SGLang serves, loaded from the same converted weights, so a weight-sync bug shows
up here as a train/inference mismatch exactly as it would with a server.
"""

from __future__ import annotations

import torch

from megatron_sapo.config import ModelConfig
from megatron_sapo.megatron.compat import device_args_suspended
from megatron_sapo.rollout import hf_mask
from megatron_sapo.rollout.base import HFWeights, Sample, SamplingParams, weight_buckets
from megatron_sapo.rollout.weights import hf_config_dict


def build_hf_model(m: ModelConfig, eos_token_id: int | None = None) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = hf_config_dict(m, eos_token_id)
    config = AutoConfig.for_model(**cfg_dict)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    return model.eval()


class ExponentialRaceSampler:
    """A logits processor after which the argmax is a sample of softmax(scores), drawn from `generator`.

    argmax_i(s_i - log E_i) with E_i ~ Exp(1) independent is token i with probability softmax(s)_i (the
    Gumbel-max trick, written with exponentials: -log E_i is a standard Gumbel). Masked tokens (-inf) stay
    out."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        race = torch.empty_like(scores, dtype=torch.float32).exponential_(generator=self.generator)
        return scores.float() - race.log()


class LocalEngine:
    def __init__(self, model_cfg: ModelConfig, eos_token_id: int, pad_token_id: int, weights=None):
        """`weights`: a state dict whose tensors become the model's own (assigned, not copied): the child of
        rollout/local_process.py runs on the parent's shared-memory weights this way."""
        self.model = build_hf_model(model_cfg, eos_token_id)
        if weights is not None:
            self.model.load_state_dict(weights, assign=True)
            self.model.tie_weights()  # assign replaced the tied tensors: tie lm_head to the embedding again
        # sdpa with a mask built without vmap: the same tokens, ~45% less generate() time on tiny models
        self.model.set_attn_implementation(hf_mask.register())
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.weight_version = -1
        # what a weight sync writes: name -> the parameter / buffer itself (lm_head is tied to the embedding)
        self._targets = self.model.state_dict(keep_vars=True)
        if self.model.config.tie_word_embeddings:
            self._targets.pop("lm_head.weight", None)

    @torch.no_grad()
    def update_weights(self, weights: HFWeights, version: int) -> None:
        """Load a dict or streamed buckets; every model weight must arrive exactly once in total. Copies into
        the model's own tensors (what load_state_dict does, without rebuilding its name map every sync)."""
        loaded, unexpected = set(), []
        for bucket in weight_buckets(weights, bucket_mb=float("inf")):
            for name, value in bucket.items():
                target = self._targets.get(name)
                if target is None:
                    unexpected.append(name)
                elif target.shape != value.shape:  # a mapping bug
                    raise ValueError(f"weight sync: '{name}' arrived as {tuple(value.shape)}, "
                                     f"the rollout model holds {tuple(target.shape)}")  # fmt: skip
                else:
                    target.copy_(value)
            loaded.update(bucket)
        missing = sorted(self._targets.keys() - loaded)
        if missing or unexpected:  # a mapping bug
            raise KeyError(f"weight sync mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.weight_version = version

    def health(self) -> bool:
        return True

    def shutdown(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        expanded = [p for p in prompts for _ in range(params.n)]
        width = max(len(p) for p in expanded)
        # left padding so that every row's next token is at the same position
        input_ids = torch.full((len(expanded), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, p in enumerate(expanded):
            input_ids[i, width - len(p) :] = torch.tensor(p)
            attention[i, width - len(p) :] = 1
        # a private generator: the global RNG stays the trainer's, also while a rollout runs ahead in a thread
        generator = torch.Generator().manual_seed(params.seed)  # reproducible rollouts for a given step seed
        with device_args_suspended():  # HF generate needs no CPU rewrite of megatron's "cuda" literals
            out = self._generate(input_ids, attention, params, generator)
        new_tokens = out.sequences[:, width:]
        # log pi_rollout: the sampling distribution softmax(logits / temperature) at the chosen token
        # (greedy, temperature 0: the model's own distribution, temperature 1)
        logits = torch.stack(out.logits, dim=1).float() / (params.temperature or 1.0)
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        return [self._sample(i, expanded[i], new_tokens[i], log_probs[i], params) for i in range(len(expanded))]

    def _generate(self, input_ids, attention, params: SamplingParams, generator: torch.Generator):
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        # generate()'s own sampling draws from the global RNG (torch.multinomial): here the warpers and
        # ExponentialRaceSampler pick the token, and generate() only takes the argmax of what they return
        warpers = []
        if params.temperature > 0:  # temperature 0: greedy
            warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_p < 1.0:
                warpers.append(TopPLogitsWarper(params.top_p))
            warpers.append(ExponentialRaceSampler(generator))
        return self.model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            logits_processor=LogitsProcessorList(warpers),
            max_new_tokens=params.max_new_tokens,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )

    def _sample(self, i, prompt, tokens, log_probs, params) -> Sample:
        tokens = tokens.tolist()
        if self.eos_token_id in tokens:
            length, reason = tokens.index(self.eos_token_id) + 1, "stop"  # the EOS token is trained on
        else:
            length, reason = len(tokens), "length"
        return Sample(
            prompt_ids=list(prompt),
            response_ids=tokens[:length],
            rollout_log_probs=log_probs[:length].tolist(),
            finish_reason=reason,
            group=i // params.n,
            weight_version=self.weight_version,
        )
