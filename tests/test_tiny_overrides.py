"""`paddlellm tiny` overrides reach the model of every family, one value per setting in config.json, and the
vocabulary has the asked size even beyond what the bundled corpus can learn (issue 25, items 2 and 3)."""
import json
import os
import re
import sys

import pytest

from conftest import FAMILIES, run_cmd
from paddlellm.families import get_family

os.environ["PADDLELLM_NO_PROGRESS"] = "1"
# every key a paddlenlp config of these families may use for the setting
KEYS = {"hidden": ("hidden_size", "n_embed", "n_embd"), "layers": ("num_hidden_layers", "n_layer", "num_layers"),
        "vocab": ("vocab_size", "padded_vocab_size")}
HIDDEN, LAYERS, VOCAB = 96, 3, 2500  # 2500: more tokens than the bundled corpus teaches any tokenizer


@pytest.mark.parametrize("family", FAMILIES)
def test_overrides_reach_config_and_model(family, tmp_path):
    from paddlellm.commands.tiny import build_tiny

    fam = get_family(family)
    out = build_tiny(family, str(tmp_path / family), vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS)
    cfg = json.load(open(os.path.join(out, "config.json")))
    for setting, want in (("hidden", HIDDEN), ("layers", LAYERS), ("vocab", VOCAB)):
        present = {k: cfg[k] for k in KEYS[setting] if k in cfg}
        assert present and set(present.values()) == {want}, (setting, present)
    assert len(fam.load_tokenizer(out)) == VOCAB
    model = fam.load_model(out)
    layers = {int(m.group(1)) for k in model.state_dict() for m in [re.search(r"\.(?:layers|h)\.(\d+)\.", k)] if m}
    assert layers == set(range(LAYERS))
    assert list(model.get_input_embeddings().weight.shape) == [VOCAB, HIDDEN]


def test_vocab_beyond_the_corpus_is_filled_and_said(tmp_path):
    """The command says in one line how many tokens were learned and how many reserved; reserved tokens are
    never produced by encoding, and the model's vocabulary is the asked one."""
    proc = run_cmd([sys.executable, "-m", "paddlellm.cli", "tiny", "--family", "gpt-3", "--vocab_size", "4000",
                    "--output", str(tmp_path / "gpt")])
    said = [line for line in proc.stderr.splitlines() if line.startswith("paddlellm tiny: ")]
    assert len(said) == 1
    learned, reserved = map(int, re.search(r"tokenizer (\d+) tokens; (\d+) reserved tokens .* to 4000$", said[0]).groups())
    assert learned + reserved == 4000 and 500 < learned < 2000
    fam = get_family("gpt-3")
    tok = fam.load_tokenizer(str(tmp_path / "gpt"))
    assert len(tok) == 4000 and json.load(open(tmp_path / "gpt" / "config.json"))["vocab_size"] == 4000
    ids = fam.encode_text(tok, "spell: 4 0 7 <unused_0> hello")
    assert max(ids) < learned and tok.convert_ids_to_tokens(learned) == "<unused_0>"
    # within the corpus's reach nothing is added, nor said
    proc = run_cmd([sys.executable, "-m", "paddlellm.cli", "tiny", "--family", "gpt-3", "--vocab_size", "500",
                    "--output", str(tmp_path / "small")])
    assert "reserved" not in proc.stderr and len(fam.load_tokenizer(str(tmp_path / "small"))) == 500
