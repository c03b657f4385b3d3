"""Small real-data teachers of every model family (issue 12), trained by examples/train_family_teacher.py.

family: stock pipeline; denoiser; objective; scheduler (default steps); CFG's unconditional branch
- sd: StableDiffusionPipeline; UNet2DConditionModel, SD 1.x layout; eps on SD's scaled_linear; PNDM (50); ""
- sdxl: StableDiffusionXLPipeline; UNet2DConditionModel with text_time; eps, scaled_linear; Euler (50); zeros
- edm: StableDiffusionXLPipeline; as sdxl; EDM denoiser and weighting; EDMEulerScheduler (50); zeros
- dit: DiTPipeline; DiTTransformer2DModel, learned sigma; eps + L_vlb (hybrid); DDIM (50); class 1000
- sd3: StableDiffusion3Pipeline; SD3Transformer2DModel; rectified flow, shift 3; FlowMatchEuler (28); ""
- flux: FluxPipeline, no guidance embedding; FluxTransformer2DModel; rectified flow, shift 1.58; FlowMatchEuler
  with dynamic shifting (28); "" (true CFG)
- sana: SanaPipeline; SanaTransformer2DModel; rectified flow, shift 3; DPM-Solver on flow sigmas (20); ""
- module: none (module_net.PixelUNet, t = i / 1000, data in [-0.5, 0.5]); eps, cosine VP; DDIM (100); class 10

All latent families share one AutoencoderKL (Sana: an AutoencoderDC) trained once on the same data (vae.py);
32x32 images -> 4x8x8 latents. Text encoders are frozen random-init CLIP / T5 / Gemma over characters (text.py),
captions "a photo of a <class>" (data.py); every family drops its condition to the unconditional branch 10% of
the time. Modules: data, text, vae, objectives (the math), training (the loop), base + unet_families +
transformer_families (the families), latent_teacher (train / save / check), module_net + module_family (the module
row), check (FD and class accuracy).
"""
