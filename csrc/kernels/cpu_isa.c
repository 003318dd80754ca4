/* cpu_isa.c: which instruction set the CPU kernels use: the one dispatcher every CPU kernel asks
 * (compress_cpu.c's scoring, policy_cpu.c's window attention and redundancy).
 *
 * The best ISA the machine supports, optionally capped by rpc_cpu_set_isa: the tests cap it to run
 * every kernel on each of its paths on one machine. The cap is process-wide and not thread-safe; it is
 * a testing switch, not a tuning knob.
 */
#include "rpc.h"

#if defined(__x86_64__) || defined(__i386__)
#define ISA_X86 1
#endif

static int isa_cap = RPC_CPU_ISA_AVX512;

static int isa_supported(int isa) {
    if (isa == RPC_CPU_ISA_GENERIC) return 1;
#ifdef ISA_X86
    __builtin_cpu_init();
    if (isa == RPC_CPU_ISA_AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (isa == RPC_CPU_ISA_AVX512) return __builtin_cpu_supports("avx512f");
#endif
    return 0;
}

int rpc_cpu_isa(void) {
    for (int isa = isa_cap; isa > RPC_CPU_ISA_GENERIC; isa--)
        if (isa_supported(isa)) return isa;
    return RPC_CPU_ISA_GENERIC;
}

int rpc_cpu_set_isa(int isa) {
    if (isa < RPC_CPU_ISA_GENERIC || isa > RPC_CPU_ISA_AVX512 || !isa_supported(isa)) return -1;
    isa_cap = isa;
    return 0;
}

const char *rpc_cpu_isa_name(int isa) {
    switch (isa) {
    case RPC_CPU_ISA_AVX2: return "avx2";
    case RPC_CPU_ISA_AVX512: return "avx512";
    default: return "generic";
    }
}
