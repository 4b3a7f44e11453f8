"""Loading from every transformers file layout, the hub path, and errors that name the problem."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from stage_min.io import loading
from stage_min.io.loading import LoadError
from stage_min.io.pretrained import from_pretrained

KEY = "decoder.model.decoder.layers.1.fc1.weight"


def copy_with_state(src, dst, edit):
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"))
    return dst


def reference_logits(model):
    torch.manual_seed(0)
    codes = torch.randint(0, 2048, (1, 4, 6))
    text, mask = model.text_condition(["funky drums"])
    return model.lm(codes, text, mask)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop(KEY), f"missing key {KEY}"),
        (lambda s: s.update({"decoder.model.decoder.layers.7.fc1.weight": torch.zeros(1)}), "unexpected key decoder.model.decoder.layers.7.fc1.weight"),
        (lambda s: s.update({KEY: torch.zeros(3, 3)}), "wrong shape for layers.1.ffn_in.weight (3, 3)"),
        (lambda s: s.pop("audio_encoder.quantizer.layers.0.codebook.embed"), "codec (EnCodec) weights: missing key quantizer.layers.0.codebook.embed"),
        (lambda s: s.pop("text_encoder.encoder.final_layer_norm.weight"), "text encoder (T5) weights: missing key encoder.final_layer_norm.weight"),
    ],
)
def test_bad_checkpoints_name_the_key(tiny_hf, tmp_path, edit, message):
    folder = copy_with_state(tiny_hf[0], tmp_path / "bad", edit)
    with pytest.raises(LoadError) as err:
        from_pretrained(str(folder))
    assert message in str(err.value)


def test_pytorch_bin_and_sharded_layouts_give_same_logits(tiny_hf, tmp_path):
    folder, hf = tiny_hf
    expected = reference_logits(from_pretrained(str(folder)))
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists() and not (sharded / "model.safetensors").exists()
    shutil.copy(folder / "spiece.model", sharded)
    binary = tmp_path / "bin"
    binary.mkdir()
    for name in ("config.json", "spiece.model"):
        shutil.copy(folder / name, binary)
    torch.save(load_file(str(folder / "model.safetensors")), binary / "pytorch_model.bin")
    for other in (sharded, binary):
        assert torch.equal(reference_logits(from_pretrained(str(other))), expected)


def test_old_weight_norm_names_are_accepted(tiny_hf, tmp_path):
    def to_old(state):
        for k in [k for k in state if ".parametrizations.weight.original" in k]:
            state[k.replace(".parametrizations.weight.original0", ".weight_g").replace(".parametrizations.weight.original1", ".weight_v")] = state.pop(k)

    folder = copy_with_state(tiny_hf[0], tmp_path / "old", to_old)
    audio = torch.randn(1, 1, 6400)
    new = from_pretrained(str(tiny_hf[0])).codec
    assert torch.equal(from_pretrained(str(folder)).codec.encode(audio), new.encode(audio))


def test_tolerated_differences_of_older_hub_files(tiny_hf, tmp_path):
    def older(state):
        state["decoder.model.decoder.embed_positions.weights"] = torch.zeros(2048, 64)
        for k in [k for k in state if k.endswith((".codebook.cluster_size", ".codebook.embed_avg", ".codebook.inited"))]:
            del state[k]

    folder = copy_with_state(tiny_hf[0], tmp_path / "older", older)
    assert torch.equal(reference_logits(from_pretrained(str(folder))), reference_logits(from_pretrained(str(tiny_hf[0]))))


def test_unknown_top_level_keys_and_sections_are_errors(tiny_hf, tmp_path):
    folder = copy_with_state(tiny_hf[0], tmp_path / "extra", lambda s: s.update({"bogus.weight": torch.zeros(1)}))
    with pytest.raises(LoadError, match="unexpected key bogus.weight"):
        from_pretrained(str(folder))
    import json

    no_audio = tmp_path / "no_audio"
    shutil.copytree(tiny_hf[0], no_audio)
    config = json.loads((no_audio / "config.json").read_text())
    del config["audio_encoder"]
    (no_audio / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match="no 'audio_encoder' section"):
        from_pretrained(str(no_audio))
    del config["decoder"]["num_hidden_layers"]
    config["audio_encoder"] = {}
    (no_audio / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match="missing 'num_hidden_layers'"):
        from_pretrained(str(no_audio))


def test_missing_pieces(tiny_hf, tmp_path):
    with pytest.raises(LoadError, match="not found"):
        from_pretrained(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LoadError, match="no config.json"):
        from_pretrained(str(empty))
    no_spiece = tmp_path / "no_spiece"
    shutil.copytree(tiny_hf[0], no_spiece)
    (no_spiece / "spiece.model").unlink()
    with pytest.raises(LoadError, match="spiece.model"):
        from_pretrained(str(no_spiece))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_hf[0], corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoadError, match="cannot read"):
        from_pretrained(str(corrupt))


def test_hub_id_downloads_into_weights_then_reuses(tiny_hf, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, local_dir, allow_patterns):
        calls.append((repo_id, allow_patterns))
        shutil.copytree(tiny_hf[0], local_dir, dirs_exist_ok=True)  # a real download resumes in place

    monkeypatch.setattr(loading, "WEIGHTS_DIR", tmp_path / "weights")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    model = from_pretrained("someone/tiny-musicgen")
    assert calls == [("someone/tiny-musicgen", loading.HUB_FILES)]
    assert (tmp_path / "weights" / "someone--tiny-musicgen" / "config.json").exists()
    from_pretrained("someone/tiny-musicgen")  # second time: from weights/, no download
    assert len(calls) == 1
    from_pretrained("other/tiny-musicgen")  # same name, another owner: its own folder
    assert [c[0] for c in calls] == ["someone/tiny-musicgen", "other/tiny-musicgen"]
    (tmp_path / "weights" / "other--tiny-musicgen" / "model.safetensors").unlink()  # a download cut short
    from_pretrained("other/tiny-musicgen")
    assert len(calls) == 3
    assert model.lm.cfg.dim == 64


def test_hub_id_offline_says_where_to_put_files(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(**kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(loading, "WEIGHTS_DIR", tmp_path / "weights")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    hub_id = "facebook/musicgen-small"  # nothing is fetched: snapshot_download is the stand-in above
    with pytest.raises(LoadError) as err:
        from_pretrained(hub_id)
    msg = str(err.value)
    assert "could not download facebook/musicgen-small" in msg and str(tmp_path / "weights" / "facebook--musicgen-small") in msg
    assert "hf download facebook/musicgen-small --local-dir" in msg


def test_native_layout_round_trip_and_context_token(tiny_hf, tmp_path):
    from stage_min.io.loading import save_native

    plain = from_pretrained(str(tiny_hf[0]))
    stage = from_pretrained(str(tiny_hf[0]), stage=True)
    assert plain.lm.cfg.vocab_in == 2049 and stage.lm.cfg.vocab_in == 2050
    table = stage.lm.embed[0].weight
    assert torch.equal(table[:2049], plain.lm.embed[0].weight)  # old rows untouched
    assert torch.allclose(table[2049], plain.lm.embed[0].weight[:2048].mean(0))  # new row: mean of the code rows
    save_native(tmp_path / "run", stage.lm.state_dict(), stage.lm.cfg, base=str(tiny_hf[0]), extra={"step": 7})
    again = from_pretrained(str(tmp_path / "run"))
    assert again.lm.cfg == stage.lm.cfg
    assert torch.equal(reference_logits(again), reference_logits(stage))
    assert not list((tmp_path / "run").glob(".*tmp"))  # no temporary file left behind
