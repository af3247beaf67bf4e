"""The runtime side never imports torch, transformers or diffusers."""

import subprocess
import sys

BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'transformers', 'diffusers', 'peft'}:
            raise ImportError('blocked: ' + name)
        return None
sys.meta_path.insert(0, Block())
"""


def run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + code], capture_output=True, text=True, timeout=120)


def test_runtime_pipeline_and_cli_import_without_torch():
    res = run_blocked(
        "import omniforge.runtime, omniforge.pipeline.spec, omniforge.pipeline.manifest, "
        "omniforge.pipeline.describe, omniforge.cli\n"
        "assert not any(m.split('.')[0] in {'torch','transformers','diffusers'} for m in sys.modules)\n"
        "print('clean')"
    )
    assert res.returncode == 0, res.stderr
    assert "clean" in res.stdout


def test_inspect_and_describe_run_without_torch(default_build):
    res = run_blocked(
        "from omniforge.cli import main\n"
        f"assert main(['inspect', {str(default_build)!r}]) == 0\n"
        f"assert main(['describe', {str(default_build)!r}]) == 0\n"
    )
    assert res.returncode == 0, res.stderr


def test_generation_runs_where_torch_cannot_be_imported(default_build):
    res = run_blocked(
        "from omniforge.runtime.llm import LlmRuntime\n"
        "from omniforge.runtime.sampling import GenerationConfig\n"
        f"rt = LlmRuntime({str(default_build)!r})\n"
        "r = rt.generate('A dog runs', GenerationConfig(max_new_tokens=8))\n"
        "assert r.new_tokens == 8\n"
        "assert 'torch' not in sys.modules\n"
        "print('generated', r.token_ids)\n"
    )
    assert res.returncode == 0, res.stderr
    assert "generated" in res.stdout


def test_whole_pipeline_runs_where_torch_cannot_be_imported(default_build, tmp_path):
    """Media in, text + image + video + audio out, in a process where importing torch fails."""
    import numpy as np
    from PIL import Image

    from omniforge.runtime.media import write_wav

    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(tmp_path / "in.png")
    write_wav(tmp_path / "in.wav", np.zeros(4000, np.float32), 16000)
    res = run_blocked(
        "from omniforge.runtime.pipeline import Pipeline, DiffusionConfig\n"
        "from omniforge.runtime.sampling import GenerationConfig\n"
        f"p = Pipeline({str(default_build)!r})\n"
        f"r = p.run('Describe this', image={str(tmp_path / 'in.png')!r}, audio={str(tmp_path / 'in.wav')!r},\n"
        "          generation=GenerationConfig(max_new_tokens=6), diffusion=DiffusionConfig(steps=2),\n"
        "          force=['image', 'video', 'audio'])\n"
        f"files = r.save({str(tmp_path / 'out')!r})\n"
        "assert len(r.images) == len(r.videos) == len(r.audios) == 1\n"
        "assert not any(m.split('.')[0] in {'torch', 'transformers', 'diffusers'} for m in sys.modules)\n"
        "print('files', len(files))\n"
    )
    assert res.returncode == 0, res.stderr
    assert "files 7" in res.stdout
