"""The `mistral-nemo` command, run in-process: main job, conversions, one-line errors."""

import pytest

from mistral_nemo.cli import main
from mistral_nemo.tokenizer import Tokenizer


def test_init_random_convert_generate(tmp_path, capsys):
    assert main(["init-random", str(tmp_path / "m"), "--preset", "tiny", "--seed", "3"]) == 0
    assert (tmp_path / "m" / "consolidated.safetensors").is_file()
    assert (tmp_path / "m" / "tekken.json").is_file()
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "h"), "--to", "hf"]) == 0
    assert (tmp_path / "h" / "model.safetensors").is_file()
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                str(tmp_path / "h"),
                "--prompt",
                "Hello",
                "--max-tokens",
                "8",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    assert out.out.strip()  # streamed text
    assert "RANDOM weights" in out.err
    assert "8 generated" in out.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "{tmp}/none", "--prompt", "x"], "none: no such file or directory"),
        (["generate", "{tmp}", "--prompt", "x"], "no tokenizer found (tekken.json or"),
        (["convert", "{tmp}/none", "{tmp}/out", "--to", "hf"], "no such file or directory"),
        (["convert", "{tmp}", "{tmp}/out", "--to", "hf"], "no params.json"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(tmp_path, capsys, argv, message):
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 1
    assert message in err and len(err.strip().splitlines()) == 1


def test_prompt_over_context_is_one_line(tmp_path, capsys):
    main(["init-random", str(tmp_path / "m")])
    capsys.readouterr()
    code = main(["generate", str(tmp_path / "m"), "--prompt", "x", "--max-tokens", "200000"])
    err = capsys.readouterr().err
    assert code == 1 and "exceeds the model's context of 131072 tokens" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["init-random", "x", "--preset", "nemo-13b"],
        ["init-random", "x", "--format", "gguf2"],
        ["convert", "a", "b", "--to", "onnx"],
    ],
)
def test_bad_flags_exit_nonzero(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_generate_chat_mode(tmp_path, capsys):
    main(["init-random", str(tmp_path / "m")])
    capsys.readouterr()
    code = main(
        [
            "generate",
            str(tmp_path / "m"),
            "--chat",
            "--system",
            "Be brief.",
            "--prompt",
            "Hi",
            "--max-tokens",
            "4",
            "--temperature",
            "0",
        ]
    )
    err = capsys.readouterr().err
    expected = Tokenizer.from_pretrained(tmp_path / "m").encode_chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert code == 0 and f"[{len(expected)} prompt tokens, 4 generated" in err


def test_no_model_means_the_demo_model(capsys):
    code = main(
        ["generate", "--chat", "--prompt", "What is the capital of France?", "--temperature", "0"]
    )
    out = capsys.readouterr()
    assert code == 0
    assert "demo model: SmolLM2-135M-Instruct" in out.err
    assert "Paris" in out.out  # a real model answers


def test_model_flag_and_gguf_export(tmp_path, capsys):
    main(["init-random", str(tmp_path / "m"), "--dtype", "fp32"])
    gguf = tmp_path / "m.gguf"
    assert main(["convert", str(tmp_path / "m"), str(gguf), "--to", "gguf", "--type", "q8_0"]) == 0
    capsys.readouterr()
    argv = ["generate", "--prompt", "Hi", "--max-tokens", "4", "--temperature", "0", "--model"]
    assert main([*argv, str(gguf)]) == 0
    assert "4 generated" in capsys.readouterr().err
    assert main(["convert", str(gguf), str(tmp_path / "back"), "--to", "hf"]) == 1
    assert "GGUF file to a checkpoint folder is not supported" in capsys.readouterr().err
