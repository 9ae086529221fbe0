"""``TReFTPlugin``: wires the ``treft:`` block into Axolotl's hooks. The work lives elsewhere."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from axolotl.integrations.base import BasePlugin

from .config_checks import uses_trainer
from .log import get_logger
from .spans import CHAT_TEMPLATE_TYPE, SEGMENTED_TYPE

if TYPE_CHECKING:
    from .args import TReFTConfig

LOG = get_logger(__name__)



def warn_about_raw_config(cfg: dict) -> list[str]:
    """Log (WARNING) every typo that would silently make this run plain SFT; returns the messages."""
    from .args import raw_config_warnings

    found = raw_config_warnings(cfg)
    for message in found:
        LOG.warning("treft: %s", message)
    return found


class TReFTPlugin(BasePlugin):
    """Token-Regularized Finetuning and the comparison regularizers for Axolotl."""

    def __init__(self) -> None:
        super().__init__()
        self.settings: TReFTConfig | None = None  # the typed treft: block, resolved once after validation
        self.settings_of = None  # the validated Axolotl config those settings were resolved from
        self.retain_dataset = None  # tokenized retain set, for KL on retain
        self.run_started: float | None = None  # SafeLoRA projects only adapter weights saved after this time
        self.trainer = None  # set in add_callbacks_post_trainer
        self.evaluated = False  # treft.eval ran (post_train is called twice)

    def get_input_args(self) -> str:
        return "axolotl_treft.args.TReFTArgs"

    def _settings(self, cfg) -> TReFTConfig | None:
        """The typed ``treft:`` settings, resolved at the first hook after Axolotl validated the config (again
        only if a hook is handed another config object, as when Axolotl runs in-process more than once)."""
        if self.settings_of is not cfg:
            from .args import treft_settings

            self.settings, self.settings_of = treft_settings(cfg), cfg
        return self.settings

    def register(self, cfg: dict) -> None:
        """Warn about typos in the raw config; switch ``type: chat_template`` datasets to the same type plus
        template segments."""
        warn_about_raw_config(cfg)
        treft = cfg.get("treft")
        if isinstance(treft, dict) and isinstance(treft.get("inoculation"), dict):
            from .defenses.inoculation import switch_dataset_types

            switch_dataset_types(cfg)
        if not isinstance(treft, dict) or not uses_trainer(treft):
            return  # interleaving or SafeLoRA alone: the datasets stay exactly Axolotl's
        lists = [cfg.get("datasets"), cfg.get("test_datasets")]
        retain = treft.get("retain")
        if isinstance(retain, dict):
            lists.append(retain.get("datasets"))
        for datasets in lists:
            for ds in datasets or []:
                if isinstance(ds, dict) and ds.get("type") == CHAT_TEMPLATE_TYPE:
                    ds["type"] = SEGMENTED_TYPE

    def load_datasets(self, cfg, preprocess: bool = False):
        """Check the chat template at start-up; build the interleaved mix when ``treft.retain`` asks."""
        settings = self._settings(cfg)
        if not settings:
            return None
        import torch

        from .datasets import check_data_files, check_template, load_datasets_with_retain, load_retain_dataset

        # Axolotl seeds only when the trainer is built, after the model (and LoRA init) load: leave the
        # global RNG exactly as a run without this plugin would, so `weight: 0` reproduces plain SFT.
        with torch.random.fork_rng(devices=[]):
            check_data_files(cfg, settings)
            check_template(cfg, settings)
            self._prepare_newer_defenses(cfg, settings)
            retain = self.settings.retain  # retain selection may have replaced its datasets
            if settings.kl and settings.kl.on == "retain":
                self.retain_dataset = load_retain_dataset(cfg, retain)
            if retain and retain.mix_ratio:
                return load_datasets_with_retain(cfg, retain, preprocess=preprocess)
        return None

    def _prepare_newer_defenses(self, cfg, settings: TReFTConfig) -> None:
        """Start-up work of inoculation (template check) and retain selection (writes the selected files)."""
        if settings.inoculation:
            from axolotl.loaders import load_tokenizer

            from .defenses.inoculation import check_inoculation

            check_inoculation(cfg, load_tokenizer(cfg))
        if settings.retain and settings.retain.select:
            from .defenses.retain_select import select_at_startup

            self.settings = settings.model_copy(update={"retain": select_at_startup(cfg, settings.retain)})

    def get_trainer_cls(self, cfg):
        settings = self._settings(cfg)
        if cfg.rl and uses_trainer(settings):  # the config validator refuses this; never hand RL an SFT trainer
            raise ValueError(f"rl: treft regularizers run on the SFT trainer only; remove `rl: {cfg.rl}`")
        if uses_trainer(settings):
            from .trainer import TReFTTrainer

            return TReFTTrainer
        return None

    def post_trainer_create(self, cfg, trainer) -> None:
        from .datasets import check_training_samples
        from .trainer import TReFTTrainer

        settings = self._settings(cfg)
        if not settings:
            return
        check_training_samples(cfg, trainer.train_dataset, getattr(trainer, "processing_class", None), settings)
        if settings.inoculation:
            from .defenses.inoculation import log_inoculated_count

            log_inoculated_count(cfg, settings.inoculation, trainer)

        if isinstance(trainer, TReFTTrainer):
            trainer.configure_treft(cfg, retain_dataset=self.retain_dataset, settings=settings)
            LOG.info("treft: regularizers active: %s", [r.key for r in trainer.treft_regularizers])

    def add_callbacks_post_trainer(self, cfg, trainer) -> list:
        self.trainer = trainer  # treft.eval logs its metrics through it after training
        settings = self._settings(cfg)
        callbacks = []
        if settings and settings.steering:
            from .defenses.steering import SteeringCallback

            callbacks.append(SteeringCallback(cfg, trainer, settings.steering))
        if settings and settings.monitor:
            from .monitor import monitor_callback

            callbacks.append(monitor_callback(cfg, trainer, settings.monitor))
        return callbacks

    def pre_model_load(self, cfg) -> None:
        settings = self._settings(cfg)
        if settings and (settings.safelora or settings.eval) and self.run_started is None:
            self.run_started = time.time()

    def post_train(self, cfg, model) -> None:
        settings = self._settings(cfg)
        safelora = None
        if settings and settings.safelora:
            from .defenses.safelora import apply_after_training

            safelora = apply_after_training(cfg, not_before=self.run_started)
        if settings and settings.eval and not self.evaluated:
            from .monitor import run_after_training

            self.evaluated = run_after_training(cfg, settings, model, self.trainer, self.run_started, safelora)


class SeedPlugin(BasePlugin):
    """Seeds torch with the config's ``seed`` right before the model loads.

    Axolotl seeds only when it builds the trainer, after the LoRA weights were initialized from a torch RNG
    state that differs between processes, so two runs of one config start from different adapters. With
    this plugin the adapter initialization, and with it the whole run, is reproducible.
    """

    def register(self, cfg: dict) -> None:
        from .args import PLUGIN_NAME

        if PLUGIN_NAME not in [str(p).replace(":", ".") for p in cfg.get("plugins") or []]:
            warn_about_raw_config(cfg)  # e.g. a `treft:` block with this plugin listed but not TReFTPlugin

    def pre_model_load(self, cfg) -> None:
        import torch

        torch.manual_seed(int(cfg.seed if cfg.seed is not None else 42))
