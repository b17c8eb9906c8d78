"""Released PyTorch weights → our Flax params, with nothing but NumPy at run time (no torch).

Every loader takes the same path::

    a .safetensors file (safetensors' NumPy loader) or a torch.save pickle (.bin/.pth/.pt/.ckpt, torch_pickle)
      → a flat NumPy state dict {"down_blocks.0.resnets.1.conv1.weight": array, …}   (state_dict.read_state_dict)
      → checkpoint names renamed to the PyTorch names our modules mirror             (a per-format key rename)
      → convert_state_dict: names → Flax paths, OIHW → HWIO, [out, in] → [in, out]   (convert.py)
      → nested Flax params, every missing / unexpected / mis-shaped key listed in one ValueError

The modules, one per format (import the one you need; this package re-exports nothing, so importing
one does not import the others):

==========================  ===============================================================================
``state_dict.py``           the one state-dict reader: a weights file by its suffix, or a model folder's
                            ``{stem}[.{variant}].safetensors`` (else ``.bin``); ``read_config_json``
``torch_pickle.py``         ``torch.save`` files (zip and legacy formats) → NumPy through a restricted
                            unpickler; ``python -m ddpm_jax.pretrained.torch_pickle IN.pth OUT.safetensors``
``convert.py``              ``convert_state_dict`` (the one torch → Flax mapping), ``flax_path``,
                            ``to_flax_layout``, ``param_shapes`` (a module's target shapes, nothing allocated)
``diffusers.py``            diffusers folders: ``UNet2DModel`` / ``UNet2DConditionModel`` (``load_unet``),
                            ``AutoencoderKL`` (``load_vae``), google/ddpm-* UNet + DDPMScheduler folders
                            (``load_ddpm_folder``)
``transformers_clip.py``    transformers CLIP folders: ``load_clip_text``, ``load_clip_vision``, ``load_clip``
``compvis.py``              single-file checkpoints, SD v1 (CompVis ldm), SD 2.x and SDXL base (Stability's
                            sgm) (``load_compvis``, ``load_single_file``): CompVis names → diffusers names,
                            OpenCLIP names → transformers names, then the same converter
``lora.py``                 LoRA files (diffusers and kohya/A1111 formats) → low-rank factors on our kernels;
                            ``merge`` (W' = W + s·(α/r)·BA, scales traced), ``read_lora``, ``LoRASet``
``export.py``               the way back (``ddpm-jax export``): a trained workdir → a diffusers DDPMPipeline /
                            AutoencoderKL or transformers CLIPModel folder, through ``convert.export_state_dict``
==========================  ===============================================================================
"""
