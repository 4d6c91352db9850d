"""Every knob of the textbook study in one dataclass; :meth:`StudyConfig.quick` is the seconds-long version."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass
class StudyConfig:
    """Settings of the four experiments. Defaults reproduce the classic demo and fit ~3 minutes on 2 cores.

    Attributes:
        seed: Seeds data, initialisation and shuffling. Every experiment reseeds from it, so experiments do
            not depend on the order they run in.
        classic_samples: Training samples of the classic ``sum(x) > 0`` task (the demo uses 1000). A
            held-out set of the same size measures accuracy per epoch.
        classic_features: Input dimension (the demo: 10).
        classic_width: Hidden width (the demo: 128).
        classic_depth: Hidden layers, each with its activation (the demo: 10, plus a linear output layer).
        classic_epochs: Epochs (the demo: 20). Fewer epochs make the "stalls" verdict easier to get
            and the "works" verdict harder.
        classic_batch_size: Batch size (the demo: 32); 1000 / 32 = 32 optimizer steps per epoch.
        sgd_lr: Plain SGD's learning rate (Keras' default 0.01, as in the demo). Larger rates can make even
            the sigmoid stack learn this easy task, which would blur "SGD stalls".
        adam_lr: Adam's learning rate (the usual default 1e-3).
        classic_variants: Which classic variants to run, by name (see ``classic.VARIANTS``); ``None`` runs all.
        decay_depth: Depth of the nets whose per-layer gradient decay is fitted. 10 matches the claim "10
            layers shrink the gradient by 1e6"; deeper nets give tighter slopes but CNNs cost more.
        decay_activations: Activations swept in the decay experiment.
        decay_inits: Initialisations swept in the decay experiment.
        decay_probe: Samples in the fixed probe batch on which gradients are measured (the same batch at
            initialisation and after training, so the two are comparable). Larger is less noisy.
        decay_train_steps: Adam steps (batch ``classic_batch_size``) of each MLP before the "after training"
            measurement (100 = 3 epochs of the classic task). Adam moves every layer whatever its gradient
            scale, so "after training" really differs from initialisation; 0 skips it. 90 nets are swept,
            so this is the main cost of the experiment.
        cnn_channels: Width of the CNN (a 3x3 conv per block). Cost grows with its square.
        cnn_image: Side of the CNN's ``1 x image x image`` inputs. Cost grows with its square.
        cnn_train_steps: Adam steps for the CNNs (each costs ~2x an MLP step); 0 skips after-training.
        rnn_steps: Sequence length of "remember the first token" (the claim is about 50-100 steps).
        rnn_hidden: Hidden size of the recurrent cells.
        rnn_vocab: Tokens: 0/1 carry the label, the rest are distractors.
        rnn_samples: Training sequences.
        rnn_probe: Sequences in the fixed probe batch of the per-time-step gradient (and held-out accuracy).
        rnn_train_steps: Adam steps (batch ``rnn_batch_size``); 0 measures at initialisation only. An LSTM
            with an open forget gate learns 50 steps in ~250; default-init cells and the RNN need far more
            (if ever), and each step of a 50-step unrolled GRU costs ~20 ms on one core.
        rnn_batch_size: Batch size of the recurrent runs.
        rnn_lr: Adam's learning rate for the recurrent runs.
        rnn_measure_every: Measure the per-time-step gradient profile every this many training steps.
        lstm_forget_bias: Initial forget-gate bias of the "open gate" LSTM variant (0 is PyTorch's default in
            effect). Larger keeps more of the cell state per step at init: sigmoid(3) = 0.95.
        explode_epochs: Epochs of each exploding run (the divergence happens in the first few).
        explode_init_scale: Weight multiplier for the "too-large init" runs (on He init of a ReLU MLP,
            the forward/backward gain per layer is this factor, so 10 layers multiply it ~scale^10).
        explode_lr: SGD learning rate for the "too-large learning rate" runs.
        clip_val: ``Trainer(gradient_clip_val=...)`` of the clipped runs (global L2 norm).
        log_every_n_steps: Monitor interval for all Lightning runs; 1 is cheap at this size.
    """

    seed: int = 0
    classic_samples: int = 1000
    classic_features: int = 10
    classic_width: int = 128
    classic_depth: int = 10
    classic_epochs: int = 20
    classic_batch_size: int = 32
    sgd_lr: float = 0.01
    adam_lr: float = 1e-3
    classic_variants: tuple[str, ...] | None = None
    decay_depth: int = 10
    decay_activations: tuple[str, ...] = ("sigmoid", "tanh", "relu", "leaky_relu", "silu")
    decay_inits: tuple[str, ...] = ("default", "xavier", "he")
    decay_probe: int = 256
    decay_train_steps: int = 100
    cnn_channels: int = 16
    cnn_image: int = 8
    cnn_train_steps: int = 50
    rnn_steps: int = 50
    rnn_hidden: int = 32
    rnn_vocab: int = 8
    rnn_samples: int = 2048
    rnn_probe: int = 128
    rnn_train_steps: int = 250
    rnn_batch_size: int = 32
    rnn_lr: float = 1e-2
    rnn_measure_every: int = 50
    lstm_forget_bias: float = 3.0
    explode_epochs: int = 5
    explode_init_scale: float = 3.0
    explode_lr: float = 1.0
    clip_val: float = 1.0
    log_every_n_steps: int = 1

    @classmethod
    def quick(cls, **overrides: object) -> StudyConfig:
        """A seconds-long version for tests: same effects, smaller nets, fewer steps and configurations."""
        config = cls(
            classic_epochs=5,
            classic_variants=(
                "sigmoid_sgd",
                "sigmoid_adam",
                "relu_sgd",
                "sigmoid_bn_sgd",
                "sigmoid_res_sgd",
                "relu_he_adam",
            ),
            decay_activations=("sigmoid", "relu"),
            decay_inits=("default", "he"),
            decay_probe=128,
            decay_train_steps=0,
            cnn_channels=8,
            cnn_train_steps=0,
            rnn_steps=30,
            rnn_hidden=16,
            rnn_samples=256,
            rnn_probe=64,
            rnn_train_steps=0,
            explode_epochs=2,
        )
        return replace(config, **overrides)  # type: ignore[arg-type]
