"""README's main command (`bash run.sh demo`) end to end, at a small sample size."""
import json
import os

import pytest

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tiny", "weights", "tiny_sd.safetensors")


@pytest.mark.skipif(not os.path.isfile(TINY), reason="tiny model weights missing")
def test_demo_erases_red_and_writes_the_picture(comfy, tmp_path, capsys):
    from conceptedit.cli import main
    from conceptedit.editing.edit import Edit
    assert main(["demo", "--out", str(tmp_path), "--prompts", "2", "--samples", "2"]) == 0
    m = json.load(open(tmp_path / "metrics.json"))
    assert m["concept"] == "red" and m["method"] == "uce"
    assert m["before"]["efficacy"]["red"] >= 0.75          # the model draws red ...
    assert m["after"]["efficacy"]["red"] <= 0.5            # ... and the edit takes most of it away
    assert os.path.getsize(m["picture"]) > 1000
    assert Edit.load(m["edit_file"]).method == "uce"
    assert "presence of red on its prompts" in capsys.readouterr().out
