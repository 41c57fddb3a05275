"""The plain-PyTorch (fp32) reference of g2g-fast: the executable form of SPEC.md.

- `ops`       fused-op twins (AdaIN / instance norm + activation + residual)
- `funit`     FUNIT generator and GPPatchMcResDis discriminator (official key layout)
- `naive`     symmetric BN encoders + LORD-style AdaIN generator
- `patchgan`  CycleGAN PatchGAN discriminator
- `identity`  frozen VGGFace2 ResNet-50 (`resnet50_ft` layout) identity encoder
- `vgg`       frozen VGG16 relu2_2 perceptual features
- `g2g`       the cross-training wiring (disassembly, reassembly, pairings)
- `losses`    hinge, R1, feature matching, LSGAN
- `steps`     per-approach D and G steps, optimisers and EMA
"""
