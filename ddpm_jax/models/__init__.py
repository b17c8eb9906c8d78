"""Neural networks only (they know nothing of diffusion): ``layers`` (timestep embedding, ResNet blocks,
attention, the spatial transformer), ``unet`` (DDPM's and Stable Diffusion's U-Net), ``vae`` (the Gaussian VAE and
AutoencoderKL), ``clip`` (CLIP's text and vision transformers), ``discriminator`` (the PatchGAN), ``flow`` (the
normalizing flow: RealNVP with Glow's pieces). Import the submodule: this package re-exports nothing."""
