"""A tiny random-weight Llama model directory, built locally for tests and demos.

Model weights cannot be downloaded on the machines this project runs on, so the vLLM tests and
the CPU demo use a model built here: a byte-level BPE tokenizer trained on a few sentences, a
2-layer Llama with random weights (seeded, so every build is identical) and a simple chat
template. Its answers are gibberish, but it exercises the real engine end to end.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

VOCAB_SIZE = 512
MAX_POSITIONS = 2048
SEED = 1234

#: the Llama's shape, as ``LlamaConfig`` names it; the CPU attention kernels reject head_dim 16:
#: hidden 128 with 2 heads gives head_dim 64
ARCHITECTURE: dict[str, int] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": MAX_POSITIONS,
}

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

#: Hermes-style: offered tools are listed in a system turn, the assistant's calls are
#: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` and tool results come back in
#: ``<tool_response>`` blocks, so vLLM's ``hermes`` tool parser reads what this template teaches
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>\n"
    "Tools:\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    'To call one answer <tool_call>\n{"name": <name>, "arguments": <object>}\n</tool_call>'
    "{{ eos_token }}\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' %}<|user|>\n<tool_response>\n{% else %}<|{{ message['role'] }}|>\n{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    # a literal newline right after a block tag would be trimmed (transformers sets trim_blocks)
    "{% if message['role'] == 'tool' %}{{ '\\n</tool_response>' }}{% endif %}"
    "{% for call in message['tool_calls'] or [] %}"
    '<tool_call>\n{"name": {{ call[\'function\'][\'name\'] | tojson }}, "arguments": {{ call[\'function\'][\'arguments\'] | tojson }}}\n</tool_call>'
    "{% endfor %}"
    "{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = [
    "The admiral reviewed the fleet at dawn and ordered every ship to hold its course.",
    "A gateway answers requests from many agents and sends each one to the right model.",
    "Caching identical prompts saves tokens, time and money for the whole fleet.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Python is a programming language; def main(): return 0 is a tiny function.",
    "Hello! How are you today? I am fine, thank you, and how is the weather there?",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 100 1000 appear in every log file.",
    "Continuous batching lets one engine serve many requests at the same time.",
    "Write a short poem about the sea, the wind, the stars and the long night watch.",
    "Summarize the report: latency went down, throughput went up, errors stayed flat.",
    # tool definitions and calls are JSON: without some in the corpus each character is a token
    '{"type": "function", "function": {"name": "get_weather", "description": "The weather.", "parameters": {"type": "object", '
    '"properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "alerts": {"type": "boolean"}, "unit": {"enum": ["c", "f"]}}, '
    '"required": ["city"], "additionalProperties": false}}}',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2, "alerts": true}}\n</tool_call>',
]


def _train_tokenizer(vocab_size: int, special: list[str] | None = None) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special if special is not None else [BOS, EOS, PAD, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tokenizer


def build_tiny_model(path: str | Path) -> Path:
    """Write a tiny Llama model (config, safetensors weights, tokenizer, chat template) to ``path``."""
    # typed as Any: neither library ships complete annotations
    torch: Any = importlib.import_module("torch")
    transformers: Any = importlib.import_module("transformers")

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(VOCAB_SIZE),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    _make_tokenizer_config_portable(out)

    config = transformers.LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, **ARCHITECTURE, **_special_token_ids(tokenizer))
    config.dtype = "float32"
    # fork_rng keeps the caller's global torch RNG untouched
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    _write_generation_config(out, tokenizer)
    return out


def _make_tokenizer_config_portable(out: Path) -> None:
    # transformers 5 writes its own class name and a separate chat_template.jinja; older
    # releases (a GPU vLLM may pin one) read only the classic keys of tokenizer_config.json
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["additional_special_tokens"] = list(ROLE_TOKENS)
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _special_token_ids(tokenizer: Any) -> dict[str, int]:
    """The BOS, EOS and PAD token ids, keyed as the model and generation configs name them."""
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def _write_generation_config(out: Path, tokenizer: Any) -> None:
    # vLLM reads default sampling values from here; keep them neutral
    (out / "generation_config.json").write_text(json.dumps(_special_token_ids(tokenizer), indent=2) + "\n")


# the tiny embedding model

#: the BERT encoder's shape, as ``BertConfig`` names it (head_dim 64, as for the Llama above)
EMBEDDING_ARCHITECTURE: dict[str, int] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
}
CLS, SEP, UNK, MASK = "[CLS]", "[SEP]", "[UNK]", "[MASK]"


def build_tiny_embedding_model(path: str | Path) -> Path:
    """Write a tiny random-weight BERT embedding model (mean pooling, normalized, Matryoshka) to ``path``.

    It is laid out as a sentence-transformers model, so vLLM serves it as a pooling model
    (``runner: pooling``) with mean pooling; ``is_matryoshka`` lets requests ask for fewer
    ``dimensions``. Every build is identical (seeded).
    """
    torch: Any = importlib.import_module("torch")
    transformers: Any = importlib.import_module("transformers")
    from tokenizers import processors

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    raw = _train_tokenizer(VOCAB_SIZE, special=[PAD, UNK, CLS, SEP, MASK])
    raw.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1", special_tokens=[(CLS, raw.token_to_id(CLS)), (SEP, raw.token_to_id(SEP))]
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw,
        cls_token=CLS,
        sep_token=SEP,
        pad_token=PAD,
        unk_token=UNK,
        mask_token=MASK,
        model_max_length=EMBEDDING_ARCHITECTURE["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(out)
    config_path = out / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")

    config = transformers.BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **EMBEDDING_ARCHITECTURE)
    config.dtype = "float32"
    config.architectures = ["BertModel"]
    config.is_matryoshka = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = transformers.BertModel(config, add_pooling_layer=False)
    model.save_pretrained(out, safe_serialization=True)
    # sentence-transformers' layout: the pooling vLLM applies (mean over tokens, then normalized)
    (out / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
            ],
            indent=2,
        )
        + "\n"
    )
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": EMBEDDING_ARCHITECTURE["hidden_size"], "pooling_mode_mean_tokens": True}, indent=2) + "\n")
    (out / "2_Normalize").mkdir(exist_ok=True)
    return out
