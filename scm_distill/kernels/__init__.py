"""Attention JVP kernels: the Triton one (`flash_attention_jvp`, needs triton; import it directly, the package
imports none), the blocked torch one for CPU (`blocked_attention_jvp`) and the autograd plumbing both share
(`jvp_function`)."""
