"""ESD-u (train_method noxattn) on the tiny model: the share of train-esd.py's first update that the
pack's official esd leaves out (biases and norm parameters; the pack trains the Linear/Conv weights).
bash run.sh bench official_unlearn   (one step, a few CPU seconds)"""
import copy
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import _pack  # noqa: E402

_pack.load()
from conceptedit.comfy_host.locate import ensure_comfy  # noqa: E402

ensure_comfy(cpu=True)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(1)
from conceptedit.comfy_host.view import ModelView  # noqa: E402
from conceptedit.editing.hooks import copy_norm_inputs  # noqa: E402
from conceptedit.editing.hosts import conditioning, latent_shape  # noqa: E402
from conceptedit.editing.training import select_targets  # noqa: E402
from conceptedit.editing.unlearn import trainer as U  # noqa: E402
from conceptedit.tiny.comfy_model import load_tiny  # noqa: E402
from test_official_unlearn import _eps, _ldm_sample_till  # noqa: E402

model, clip, _ = load_tiny()
host = ModelView(model, clip).denoiser
text = host.text
ac = host.alphas_cumprod().float()
(c, _), (u, _) = conditioning(host, text, ["red"]), conditioning(host, text, [""])
unet = host.unet()
orig = copy.deepcopy(unet).requires_grad_(False)
train = copy.deepcopy(unet).requires_grad_(True)
copy_norm_inputs(train)
params = {n: p for n, p in train.named_parameters()
          if not (n.startswith("out.") or "attn2" in n or "time_embed" in n)}  # train-esd.py 'noxattn'
before = {n: p.detach().clone() for n, p in params.items()}
opt = torch.optim.Adam(params.values(), lr=1e-5)
g = torch.Generator().manual_seed(3 + 17)
t_enc = torch.randint(50, (1,), generator=g)
t = torch.randint(round(int(t_enc) / 50 * 1000), round(int(t_enc + 1) / 50 * 1000), (1,), generator=g)
x = torch.randn((1, *latent_shape(host)), generator=g)
with torch.no_grad():
    z = _ldm_sample_till(train, c.float(), u.float(), x, 50, 3.0, int(t_enc), ac)
    e0, ep = _eps(orig, z, t, u.float()), _eps(orig, z, t, c.float())
F.mse_loss(_eps(train, z, t, c.float()), e0 - (ep - e0)).backward()
opt.step()
upd = {n: p.detach() - before[n] for n, p in params.items()}
pack = {m + ".weight" for m in select_targets(dict(unet.named_modules()), "noxattn")}
size = lambda d: math.sqrt(sum(float(v.pow(2).sum()) for v in d.values()))  # noqa: E731
left = {n: v for n, v in upd.items() if n not in pack}
print(f"ESD-u: {len(params)} tensors in the script's set, {len(pack)} in the pack's; share of the first update "
      f"left out {size(left) / size(upd):.3g} (of which norms {size({n: v for n, v in left.items() if 'norm' in n}) / size(upd):.3g})")
missing = [n for n in pack if n not in params]
print("pack weights outside the script's set:", missing[:5])
edit = U.compute_unlearn(host, text, "red", U.UnlearnConfig(method="esd", param_set="noxattn", steps=1, lr=1e-5,
                                                            seed=3, official="esd"), family="tiny")
got = {k[len("diffusion_model."):]: c.delta(dtype=torch.float32) for k, c in edit.changes.items()}
num = sum(float((got.get(n, torch.zeros_like(v)) - v).pow(2).sum()) for n, v in upd.items() if n in pack)
print(f"pack official esd (noxattn) vs the script on the same weights: {math.sqrt(num) / size({n: upd[n] for n in pack}):.2e}")
