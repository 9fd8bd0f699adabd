"""Message text and ChatML rendering shared by the gateway's hasher and enginesim."""

from __future__ import annotations

from typing import Any

import pytest

from kvcache.prompt import message_text, render_chatml


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, ""),
        ("hi", "hi"),
        (
            [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}, {"text": "b"}],
            "ab",
        ),
        ([{"type": "text", "text": "a"}, "junk"], "a"),
        (42, "42"),
    ],
)
def test_message_text(content: Any, expected: str) -> None:
    assert message_text(content) == expected


def test_render_chatml() -> None:
    pairs = [("user", "hi"), ("assistant", "yo")]
    assert render_chatml(pairs) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_chatml(pairs, add_generation_prompt=False).endswith("yo<|im_end|>\n")
    with_default = render_chatml([("user", "hi")], default_system="S")
    assert with_default.startswith("<|im_start|>system\nS<|im_end|>\n")
    own_system = render_chatml([("system", "X"), ("user", "hi")], default_system="S")
    assert "\nS<" not in own_system
