"""A tiny real causal language model and tokenizer, built offline for tests.

``build_tiny_lm(folder)`` writes an HF-layout checkpoint (``config.json``, ``model.safetensors``,
tokenizer files with a chat template) that ``transformers`` loads with ``from_pretrained``. Nothing is
downloaded: the tokenizer is a word-level ``tokenizers`` model over a fixed word list, the model a
two-layer Llama with random weights drawn from ``seed``. The same arguments give the same bytes of
weights, so tests can compare scores across runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["TINY_WORDS", "SPECIAL_TOKENS", "CHAT_TEMPLATE", "build_tiny_tokenizer", "build_tiny_lm"]

# the vocabulary: every word used by the test data must be here (others become [UNK])
TINY_WORDS: tuple[str, ...] = tuple(
    "the a cat dog sat on mat rug ran to park home and is was big small red blue green "
    "what where who how why do does did you i we they it says said answer question yes no "
    "hello world good bad day night sun moon tree house , . ? !".split()
)
# special tokens, in id order: [PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3, then the chat markers
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "<|user|>", "<|assistant|>",
                                   "<|system|>", "<|end|>")
# one turn renders as "<|role|> content <|end|>"; the whole chat starts with [BOS]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|> {{ message['content'] }} <|end|> "
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tiny_tokenizer(vocab_words: Sequence[str] = TINY_WORDS):
    """A word-level ``PreTrainedTokenizerFast`` that prepends [BOS] and carries ``CHAT_TEMPLATE``.

    Args:
        vocab_words: the words of the vocabulary (after the special tokens, in this order).

    Returns:
        The tokenizer (not saved).
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for word in (*SPECIAL_TOKENS, *vocab_words):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos = vocab["[BOS]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", pair="[BOS] $A $B:1", special_tokens=[("[BOS]", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]",
                                   unk_token="[UNK]", pad_token="[PAD]")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_lm(folder: Path, *, seed: int = 0, vocab_words: Sequence[str] = TINY_WORDS,
                  tie_word_embeddings: bool = False, hidden_size: int = 32,
                  num_layers: int = 2) -> Path:
    """Save a tiny random Llama causal LM plus its tokenizer into ``folder``.

    Args:
        folder: where to write (created if missing).
        seed: the torch seed the random weights are drawn from.
        vocab_words: the tokenizer's words (see ``build_tiny_tokenizer``).
        tie_word_embeddings: tie ``lm_head`` to the input embeddings (then the checkpoint has no
            ``lm_head.weight``).
        hidden_size: model width (4 attention heads, 2 key/value heads).
        num_layers: number of decoder layers.

    Returns:
        ``folder``.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(vocab_words)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # the default init has std 0.02 everywhere: widen it so different seeds give clearly
        # different losses
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
