/* Loaded (RTLD_GLOBAL) before torch by pdgrpc.engine.mkl_dispatch; never imported as a Python module.
 *
 * The MKL that PyTorch links in picks its compute kernels by CPU vendor first: on a CPU that is not
 * "GenuineIntel" it takes generic code paths even where the CPU has AVX-512 (AMD Zen 4/5). It asks
 * through these two functions, which libtorch_cpu.so exports and calls through its PLT, so a
 * definition found earlier in the global symbol scope answers instead. MKL still checks each
 * instruction set through CPUID (AVX-512, AMX, ...) before using it; only the vendor test is skipped. */
int mkl_serv_intel_cpu_true(void) { return 1; }
int mkl_serv_intel_cpu(void) { return 1; }
