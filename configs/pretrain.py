"""UNITER pretraining (MLM, MRFR, MRC-kl, ITM + WRA), one task per update.

Default: a small UNITER on the bundled synthetic world; runs on a 2-core CPU in minutes.
  python main.py --config=configs/pretrain.py --workdir=workdir/pretrain

The paper's settings (spec 3.10), with data converted by data_prep (see README):
  python main.py --config=configs/pretrain.py:base --workdir=gs://.../uniter-base \
      --config.data.image_dirs=data/coco_img,data/vg_img \
      --config.data.text_dirs=data/coco_txt,data/vg_txt \
      --config.data.val_text_dirs=data/coco_val_txt --config.init_from=uniter-base-init.pt
  python main.py --config=configs/pretrain.py:large ...   (UNITER-large, all-data mix)

Overrides: --config.total_steps=..., --config.model.dtype=bfloat16, --config.mesh.fsdp=8, ...
Variant arguments: `:tiny` (smallest, for tests), `:default,steps=200`.
"""

import ml_collections

from configs import common
from data_prep.synthetic import scene as synthetic_scene


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, variant="default", steps=0)
  c = ml_collections.ConfigDict()
  c.seed = 42
  c.task = "pretrain"
  c.init_from = ""  # a params.msgpack, an orbax checkpoint folder or an official .pt / .npz

  # Data: TFRecord folders in our format (docs/data_format.md). With synthetic set, the
  # world is generated there on first use and the dirs below are filled from it.
  c.data = ml_collections.ConfigDict()
  c.data.synthetic = "data/synthetic"
  c.data.text_dirs = ""  # comma-separated
  c.data.image_dirs = ""
  c.data.val_text_dirs = ""
  c.data.val_image_dirs = ""
  c.data.vocab = ""  # vocab.txt; default: the synthetic world's
  c.data.batch_size = 32  # global examples per micro-batch (fixed per bucket)
  c.data.token_budget = 0  # >0: token budget per micro-batch instead of a fixed batch size
  c.data.txt_buckets = (40,)  # one bucket: one compile on CPU
  c.data.img_buckets = (16,)
  c.data.max_txt_len = 38  # synthetic texts are short; the official max_txt_len is 60
  c.data.feat_dtype = "float32"
  c.grad_accum_steps = 1

  c.model = common.model_config("tiny", hidden_size=128, num_layers=4, num_heads=4,
                                intermediate_size=512, max_position_embeddings=64)
  # MLM-heavy mix for the small world: MLM is where this model learns to ground words in
  # regions (see mlm_focus_words), and ITM + WRA is the costliest step on a CPU.
  c.tasks = ml_collections.ConfigDict({"mlm": 6.0, "mrfr": 1.0, "mrckl": 1.0, "itm": 2.0})
  c.mlm_prob = 0.15
  # Not in UNITER (off in :base / :large): these words are masked with mlm_focus_prob
  # instead of mlm_prob, as ERNIE-ViL masks scene-graph words. On the synthetic world a
  # model trained from scratch never looks at the regions under uniform masking (its
  # colour/shape word accuracy equals that with another image's regions after 3000 MLM
  # steps); masking every colour and shape word makes it ground them within ~250 steps.
  c.mlm_focus_words = ",".join(synthetic_scene.COLOUR_NAMES + synthetic_scene.SHAPES)
  c.mlm_focus_prob = 1.0
  c.mrm_prob = 0.15
  c.itm_neg_prob = 0.5
  c.ot_lambda = 0.1
  c.ot_solver = "sinkhorn"

  c.optimizer = ml_collections.ConfigDict(dict(
      lr=3e-4, warmup_steps=100, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01,
      grad_clip=5.0, mu_dtype=""))
  c.total_steps = 1200
  c.log_every_steps = 50
  c.eval_every_steps = 600
  c.eval_batches = 8
  c.checkpoint_every_steps = 600
  c.keep_checkpoints = 2
  c.stop_at_step = 0  # >0: save and stop there as if preempted (tests, debugging)
  common.mesh_config(c)

  if a.variant == "tiny":  # tests and smoke runs: seconds, not minutes
    c.model = common.model_config("tiny", max_position_embeddings=64)
    c.total_steps, c.log_every_steps, c.eval_every_steps = 20, 5, 10
    c.checkpoint_every_steps, c.eval_batches = 10, 2
    c.data.batch_size = 16
  elif a.variant in ("base", "large"):
    # Official pretrain-indomain-base-8gpu / pretrain-alldata-large-16gpu (spec 3.10).
    c.data.synthetic = ""
    c.mlm_focus_words = ""  # official masking
    c.model = common.model_config(a.variant)
    c.model.vocab_size, c.model.img_dim, c.model.img_label_dim = 28996, 2048, 1601
    c.model.dtype = "bfloat16"
    c.data.batch_size = 0
    c.data.token_budget = 10240 * 8 if a.variant == "base" else 6144 * 16
    c.data.txt_buckets = (24, 40, 64)
    c.data.img_buckets = (36, 64, 100)
    c.data.max_txt_len = 60
    c.grad_accum_steps = 2 if a.variant == "base" else 4
    if a.variant == "base":  # in-domain COCO+VG mix: itm 2, mlm 2, mrfr 1, mrckl 1
      c.tasks = ml_collections.ConfigDict({"mlm": 2.0, "mrfr": 1.0, "mrckl": 1.0, "itm": 2.0})
    else:  # all-data mix summed over COCO/VG/CC/SBU: itm 30, mlm 40, mrfr 20, mrckl 20
      c.tasks = ml_collections.ConfigDict({"mlm": 40.0, "mrfr": 20.0, "mrckl": 20.0,
                                           "itm": 30.0})
    c.optimizer.lr = 5e-5
    c.optimizer.warmup_steps = 10_000
    c.total_steps = 200_000 if a.variant == "base" else 500_000
    c.log_every_steps = 100
    c.eval_every_steps = 5000 if a.variant == "base" else 10_000
    c.checkpoint_every_steps = 5000
    c.eval_batches = 50
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1})
  elif a.variant != "default":
    raise ValueError(f"unknown variant {a.variant!r}; use default, tiny, base or large")
  if a.steps:
    c.total_steps = a.steps
  return c
