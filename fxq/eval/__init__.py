"""Tools that measure a quantized model, not part of the compiler: the offline benchmark dataset, FID/KID/IS with
fxq's classifier, sampling to images and PSNR, and per-quantizer diagnosis."""
