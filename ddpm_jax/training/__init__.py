"""Trainers: ``loop`` (what every trainer shares: TrainState, Adam with warm-up and clipping, the EMA, the
held-out split, resume / step / check / log / checkpoint / hooks), then one file per trainer: ``diffusion``
(Algorithm 1 of Ho et al. 2020), ``autoencoder`` (the Gaussian VAE and LDM's AutoencoderKL), ``clip``
(CLIP's contrastive training), ``flow`` (the normalizing flow on dequantised bits/dim). Trainers read other
runs through ``workdir.py`` and never import each other."""
