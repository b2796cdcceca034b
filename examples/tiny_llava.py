"""Three tiny LLaVA "fine-tunes" of one base: try soup on a vision-language model in seconds, on CPU.

    python examples/tiny_llava.py vlm-demo

writes ``vlm-demo/ft-chat``, ``vlm-demo/ft-ocr`` and ``vlm-demo/ft-math``: transformers'
``LlavaForConditionalGeneration`` checkpoints (a CLIP vision tower, a two-layer MLP projector and a
Llama language model; bfloat16, random weights) with their processor (image processor, word-level
tokenizer, chat template). As in real supervised fine-tuning, the vision tower was frozen: it is the
base's in all three, while the projector and the language model moved. Nothing is downloaded, and
this script does not use soup.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

WORDS = "what is in the image ? a an red blue green cat dog big small text says number one two".split()
SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "<image>"]  # ids 0..4
FINETUNES = ("ft-chat", "ft-ocr", "ft-math")
FROZEN = "model.vision_tower."  # the vision tower's parameters (names in memory, transformers 5)


def build_processor():
    """A ``LlavaProcessor``: 8x8 images in 4x4 patches (4 image tokens), a word-level tokenizer."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import LlavaProcessor, PreTrainedTokenizerFast

    try:  # the PIL image processor: no torchvision needed
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor as ImageProcessor

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]",
                                        unk_token="[UNK]", pad_token="[PAD]",
                                        extra_special_tokens={"image_token": "<image>"})
    images = ImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=4,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template="{% for m in messages %}{{ m['content'] }} {% endfor %}")


def build_model(seed: int = 0):
    """A random tiny ``LlavaForConditionalGeneration`` (bfloat16, eval mode)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=8, patch_size=4)
    text = LlamaConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=64, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=SPECIAL.index("<image>"),
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).to(torch.bfloat16).eval()


def finetune(model, seed: int, scale: float = 0.002) -> None:
    """Move every parameter but the vision tower's a little, as a fine-tune with a frozen tower does."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(FROZEN):
                p.add_((scale * torch.randn(p.shape, generator=g)).to(p.dtype))


def write_finetunes(root: Path, names=FINETUNES, *, seed: int = 0) -> list[Path]:
    """Save one fine-tune of the seed's base model per name under ``root``, each with its processor."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    processor, folders = build_processor(), []
    for i, name in enumerate(names):
        model = build_model(seed)
        finetune(model, seed=1000 * seed + i + 1)
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
        folders.append(root / name)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="where to write the fine-tunes")
    parser.add_argument("--seed", type=int, default=0, help="the base model's random seed")
    args = parser.parse_args()
    for folder in write_finetunes(args.folder, seed=args.seed):
        print(folder)


if __name__ == "__main__":
    main()
