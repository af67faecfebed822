"""Shared fixtures. The expensive ones (used by tests marked `integration`): one local
Ray cluster, one tiny model, two vLLM engine actors joined to one weight group with
this test process as the sender.

Every update in the session goes through `Updater`, which keeps versions rising and
holds the transformers reference model carrying the weights last sent.
"""
from __future__ import annotations

import os

import pytest
import ray
import torch

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from rlloop.actors.engine import EngineConfig, Sampling, engine_actor  # noqa: E402
from rlloop.actors.weight_sync import UpdatePusher, form_weight_group  # noqa: E402
from rlloop.models.tiny import build_tiny_model  # noqa: E402
from rlloop.weights.protocol import WeightUpdateRequest, make_plan, parameter_infos  # noqa: E402
from rlloop.weights.sender import buckets_of  # noqa: E402


@pytest.fixture(scope="session")
def greedy() -> Sampling:
    """Greedy decoding of a fixed length: engines and transformers must agree token for token."""
    return Sampling(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="session")
def probe_prompts() -> list[str]:
    return ["12+7=", "hello world", "The answer is", "3*(4+5)="]


# A user's data: GSM8K-style rows, each its own question (ids as the JSONL names them).
OWN_DATA = [{"id": f"q{i}", "question": f"Tom has {i} apples and buys {i + 3} more. How many apples?",
             "answer": f"{i} + {i + 3} = {2 * i + 3}\n#### {2 * i + 3}"} for i in range(16)]
OWN_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
                     "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="session")
def own_model(tmp_path_factory):
    """A model nobody on the project made: a Llama config, and a byte-level BPE tokenizer
    trained here on the data, with its own chat template and special tokens."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("own") / "llama"
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
    texts = [r["question"] + " " + r["answer"] for r in OWN_DATA] + ["Solve it step by step."]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = OWN_CHAT_TEMPLATE
    tok.save_pretrained(path)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    data = path.parent / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in OWN_DATA))
    return path, data


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0))


@pytest.fixture(scope="session")
def ray_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never another cluster
    yield
    ray.shutdown()


class Updater:
    """The sending side of the test session: a reference HF model and a sender."""

    def __init__(self, model_path, engines, sender):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.engines = engines
        self.sender = sender
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.reference = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.pusher = UpdatePusher(engines, sender.shared)
        self.version = self.pusher.version  # versions only rise
        self.plan = make_plan(parameter_infos(self.tensors().items()), bucket_bytes=256 << 10)

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.reference.state_dict()

    def randomize(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.reference.named_parameters():
                scale = 0.02 if "norm" not in name else 0.1
                base = 1.0 if "norm" in name else 0.0
                p.copy_(base + scale * torch.randn(p.shape, generator=g) * 2.5)

    def request(self, version=None, plan=None) -> WeightUpdateRequest:
        return WeightUpdateRequest(self.version + 1 if version is None else version, plan or self.plan)

    def push(self, seed: int, kv: str | None = None):
        """Randomize the reference with `seed` and send it as the next version (`kv`:
        the engines' kv_after_update for this update)."""
        self.randomize(seed)
        req = self.request()
        tensors = self.tensors()
        stats, send = self.pusher.push(req, lambda: self.sender.send(req, buckets_of(req.plan, tensors)), kv=kv)
        self.version = req.version
        return stats, send

    def greedy_reference(self, prompt: str, n: int) -> list[int]:
        ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = self.reference.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None,
                                          pad_token_id=1)
        return out[0, ids.shape[1]:].tolist()

    def token_logprobs(self, prompt: str, tokens: list[int]) -> torch.Tensor:
        ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        full = torch.cat([ids, torch.tensor([tokens])], dim=1)
        with torch.no_grad():
            logits = self.reference(full).logits[0, ids.shape[1] - 1:-1]
        return torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


@pytest.fixture(scope="session")
def engines(ray_cluster, tiny_model):
    cfg = EngineConfig(model=tiny_model, max_model_len=512)
    handles = [engine_actor(cfg, name=f"fixture/engine/{i}") for i in range(2)]
    ray.get([h.ready.remote() for h in handles])
    yield handles
    ray.get([h.shutdown.remote() for h in handles])


@pytest.fixture(scope="session", params=["gloo", "shm"])
def updater(engines, tiny_model, request):
    """Every in-flight update test runs over both wires: a gloo broadcast and the
    shared-memory region (the CPU twin of CUDA IPC)."""
    sender = form_weight_group(engines, [1, 1], backend=request.param, timeout_s=60)
    up = Updater(tiny_model, engines, sender)
    yield up
    sender.close()
