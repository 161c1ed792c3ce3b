"""Shared test helpers: tiny random Llama models built with HF transformers, the independent oracle."""

import pytest
import torch

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               # a tiny original context, so that test sequences of 100+ tokens run far past it and a missing
               # or wrong frequency scaling changes the logits by ~1e-2 (at 8192 it would hide under 1e-4)
               "original_max_position_embeddings": 32}


def hf_config(**overrides):
    """An HF LlamaConfig for a tiny model (float32, eager attention for the tightest reference)."""
    from transformers import LlamaConfig

    rope = dict(LLAMA3_ROPE)
    rope.update(overrides.pop("rope", {}))
    rope_theta = overrides.pop("rope_theta", 500000.0)
    rope_parameters = {"rope_type": "default", "rope_theta": rope_theta} if rope.get("rope_type") == "default" \
        else {**rope, "rope_theta": rope_theta}
    kwargs = dict(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, rope_parameters=rope_parameters,
                  attn_implementation="eager", bos_token_id=None, eos_token_id=None, pad_token_id=None)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def hf_model(seed=0, **overrides):
    """A randomly initialised HF LlamaForCausalLM in float32, eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_config(**overrides)).eval()
    # HF's default init (std 0.02) gives near-uniform next-token distributions; a larger spread makes the
    # logits depend strongly on every weight, so that a wrong permutation or mapping cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08 if "embed" not in name else 1.0)
            else:
                p.uniform_(0.5, 1.5)  # RMSNorm weights: not all ones, so a swapped norm shows
    return model


def hf_greedy(hf, prompts, max_new_tokens):
    """HF generate(do_sample=False) with left padding and its attention mask; returns new ids and logits."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                          min_new_tokens=max_new_tokens, pad_token_id=0, output_logits=True,
                          return_dict_in_generate=True)
    return out.sequences[:, width:].tolist(), torch.stack(out.logits, dim=1)  # (bs, new, vocab)


@pytest.fixture
def hf_folder(tmp_path):
    """Factory: save a tiny HF model to a fresh folder; returns (folder, hf_model)."""
    counter = iter(range(1000))

    def make(seed=0, **overrides):
        model = hf_model(seed, **overrides)
        folder = tmp_path / f"hf{next(counter)}"
        model.save_pretrained(folder)
        return folder, model

    return make


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory):
    """The trained demo model's checkpoint folder (llama31/demo), expanded once per session in a private cache."""
    import llama31.demo as demo

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLAMA31_CACHE", str(tmp_path_factory.mktemp("llama31_cache")))
        return demo.demo_checkpoint()


def memory_flags(tensor) -> list[str]:
    """The kernel's flags for the memory region holding ``tensor``'s first byte (Linux /proc/self/smaps VmFlags:
    'hg' = asked for huge pages with madvise), read independently of how the memory was allocated."""
    address = tensor.data_ptr()
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no memory region of this process holds address {address:#x}")
