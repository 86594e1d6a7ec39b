"""Method defaults (shared/METHOD.md). Dataset configs start from this and change only what differs.

Run: python -m softpatch_jax.main --config=configs/demo.py --workdir=/tmp/sp_demo
Any value can be overridden on the command line, e.g. --config.noise.ratios=0.0,0.1
"""

import ml_collections
from ml_collections import config_dict

from softpatch_jax import contamination, discriminators


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Where the images come from. `layout` picks the reader (see softpatch_jax/data/__init__.py).
    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "mvtec"
    c.dataset.layout = "mvtec"
    c.dataset.root = ""
    c.dataset.categories = "all"  # "all" or a comma-separated list
    c.dataset.resize = 256  # shorter side, bilinear (METHOD.md section 2)
    c.dataset.crop = 224  # center crop
    # the largest batch per backbone call; the rest runs in power-of-two batches (1 image costs 1)
    c.dataset.batch_size = 32
    # True: decode once into a TFDS array_record store (resized, uncropped), re-read from it after.
    c.dataset.prepared = False
    c.dataset.data_dir = ""  # the store's folder; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    # Real-IAD's split and resolution (configs/realiad.py); unused by the other layouts.
    c.dataset.split = ""
    c.dataset.resolution = ""

    # Noisy training set (METHOD.md section 6). ratios: comma-separated, each run in turn.
    c.noise = ml_collections.ConfigDict()
    c.noise.ratios = "0.1"
    c.noise.overlap = False  # True: injected anomalies stay in the test set (augmented in train)
    c.noise.rotation_deg = 3.0  # overlap mode: rotation uniform in [-3, 3] degrees
    c.noise.translate = 0.03  # overlap mode: translation uniform in [-3%, 3%] of width/height

    c.backbone = ml_collections.ConfigDict()
    c.backbone.arch = "wide_resnet50_2"
    c.backbone.layers = ""  # empty: the architecture's default stride-8/stride-16 pair
    c.backbone.weights = (
        ""  # explicit weights file (.pth, .safetensors or an orbax dir); "" = resolve
    )
    c.backbone.cache_dir = ""  # orbax cache of converted weights; "" = ~/.cache/softpatch_jax
    c.backbone.allow_random_init = False  # only for smoke tests: random features are near-useless
    c.backbone.dtype = "float32"  # or "bfloat16" (parameters stay float32)
    # EfficientNet-Lite's depthwise convolutions: "auto" = "shifted" (a fused sum of shifted
    # multiplies, 4-18x faster than XLA's grouped conv on CPU) on CPU, "conv" on GPU/TPU; the two
    # agree to float32 rounding (models/efficientnet_lite.py).
    c.backbone.depthwise = "auto"

    # Patch embedding (METHOD.md section 2).
    c.embedding = ml_collections.ConfigDict()
    c.embedding.patch_size = 3  # local aggregation window
    c.embedding.pretrain_dim = 1024  # each layer's unfolded vector is pooled to this
    c.embedding.target_dim = 1024  # D: the concatenation is pooled to this
    # How patch features are kept between stages (read back in float32). float16 halves host/device
    # memory for large N; distances then move by ~1e-3 relative.
    c.embedding.store_dtype = "float32"

    # Methods run on the same features: patchcore, softpatch (uses softpatch.discriminator),
    # softpatch_nearest, softpatch_gaussian, softpatch_lof, softpatch_plus, image_denoise.
    c.methods = "patchcore,softpatch_lof,softpatch_plus"

    c.softpatch = ml_collections.ConfigDict()
    c.softpatch.discriminator = "lof"  # for `softpatch` and `image_denoise`
    c.softpatch.discriminators = "gaussian,lof"  # SoftPatch+ fusion (any registered subset)
    # tau: a fraction, or "auto" (estimated per training set from the discriminator scores; soft
    # weights fade to 1 on images that look clean: README "Unknown contamination"), or "oracle"
    # (the true contaminated patch fraction; experiments with injected noise only). Typed `object`
    # so a float field also takes the words.
    c.softpatch.tau = _tau(0.15)  # SoftPatch, and SoftPatch+'s classification bank (tau_cls)
    c.softpatch.tau_seg = _tau(0.50)  # SoftPatch+'s segmentation bank
    # tau "auto": contamination.ESTIMATORS (image_floor, image_contrast, image_share,
    # image_share_global, image, tail, lof)
    c.softpatch.auto_estimator = contamination.DEFAULT
    # tau "auto" on a set found contaminated removes at least these (the authors' tau, tau_seg);
    # a set found clean removes nothing. 0 = the estimate alone.
    c.softpatch.auto_floor = contamination.FLOOR  # 0.15
    c.softpatch.auto_floor_seg = contamination.FLOOR_SEG  # 0.5
    c.softpatch.soft_weight = "lof"  # SoftPatch+: lof | nearest | gaussian | fused | none
    c.softpatch.rank_scope = "all"  # SoftPatch+ rank normalisation: "all" patches or "position"
    c.softpatch.projection_dim = 128  # R; 0 = discriminators and coreset on the full D
    # Every registered discriminator's parameters, with the defaults its module declares
    # (softpatch_jax/discriminators/*.py): lof_k = LOF's k (6), gaussian_eps = the Gaussian's
    # covariance regulariser (0.01), ...
    c.softpatch.update(discriminators.config_defaults())
    # Discriminator precision. auto: the nearest distance, and the Gaussian where N <=
    # projection_dim, in float64 (scores kept as float32 hi + lo, ranked in float64 order). The
    # saturated Gaussian distances and the float32 expanded-form nearest distances differ from the
    # exact ones by more than neighbours at the tau quantile do (README "Fidelity"). TPUs: float32.
    c.softpatch.score_dtype = "auto"  # auto | float32 | float64

    # The `inreach` method (InReaCh, ICCV 2023; softpatch_jax/inreach.py): keep the patches of
    # mutual-nearest-neighbour channels across training images that are long and tight.
    c.inreach = ml_collections.ConfigDict()
    c.inreach.window = 1  # mutual neighbours searched within (2w+1)^2 grid cells of the position
    c.inreach.min_length = 0.5  # a kept channel spans at least this fraction of the images
    c.inreach.spread_quantile = 0.9  # and is no wider than this quantile of the long channels

    # Approximate greedy k-center coreset (PatchCore).
    c.coreset = ml_collections.ConfigDict()
    c.coreset.ratio = 0.1  # of ALL N*P patches, removed ones included in the count
    # Start points: 128 as the authors' code runs (its weighted sampler passes the projection size
    # into the start count, for every method); PatchCore's paper uses 10 (README "Fidelity").
    c.coreset.num_starts = 128
    # True reproduces a defect of the authors' loop for exact comparison only: its starting
    # distances are not masked, so its first pick can be a removed (noisy) patch.
    c.coreset.strict_parity = False

    c.scoring = ml_collections.ConfigDict()
    # Patch score = soft weight x distance to the nearest memory patch: "squared" L2 as the authors'
    # code (faiss IndexFlatL2) and its published numbers; "l2" is the paper's eq. 10.
    c.scoring.distance = "squared"
    c.scoring.blur_sigma = 4.0
    # test patches per nearest-neighbour chunk; 0 = sized from memory (on CPU: from a cache-sized
    # block, scoring.CPU_BLOCK_BYTES)
    c.scoring.chunk_size = 0
    # Nearest-neighbour search (scoring.SEARCHES), every choice with the exact search's results:
    # "auto" = "exact" on CPU (a bfloat16 product does not pay there), "bfloat16" on accelerators
    # (tensor-core candidates, certified or searched again exactly).
    c.scoring.search = "auto"

    # Multi-device: "auto" shards positions / the coreset pool / the memory bank over all local
    # devices when there is more than one (softpatch_jax/parallel.py); "true" / "false" force it;
    # a comma list picks stages: "discriminators" on a CPU host split into devices.
    c.parallel = ml_collections.ConfigDict()
    c.parallel.enabled = "auto"

    c.eval = ml_collections.ConfigDict()
    # Metrics of every results row: "all" (image/pixel AUROC, pixel AUPRO, pixel/image AP,
    # image/pixel F1-max, and sample AUROC/AP where file names carry views, as Real-IAD's:
    # softpatch_jax/metrics.py) or a comma list of them; image and pixel AUROC are computed
    # whatever the list says.
    c.eval.metrics = "all"
    # Anomaly maps saved to maps/*.npz for the report's figures: this many test images per category
    # (one good, the rest spread over the defects), plus the images named in map_images, a comma
    # list of CATEGORY/PATH under the category's test images, e.g. "pill/crack/003.png".
    c.eval.save_maps = 0
    c.eval.map_images = ""
    # Pixel metrics at "crop" (the model's input: resized, centre-cropped masks) or "original" (each
    # mask's own size, binarised at > 127, maps upsampled bilinearly: ADEval's, Real-IAD's official
    # evaluator; softpatch_jax/official_eval.py).
    c.eval.pixel_resolution = "crop"
    # True: also write each cell's test predictions in ADEval's input format, adeval/CELL_ID.pkl
    # (maps in the resized frame: T x resized H x W float32), for `python -m adeval`.
    c.eval.adeval_pickle = False
    return c


def _tau(value: float) -> config_dict.FieldReference:
    return config_dict.FieldReference(value, field_type=object)
