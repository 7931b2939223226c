# Sourced by test.sh and sanitize.sh. onednn_isa TIER: the ONEDNN_MAX_CPU_ISA that caps
# oneDNN to fusedattn's tier TIER (so that a tier's tests do not run oneDNN's higher kernels).
onednn_isa() {
  case $1 in
    scalar) echo SSE41 ;;
    avx2) echo AVX2 ;;
    avx512) echo AVX512_CORE ;;
    avx512_bf16) echo AVX512_CORE_BF16 ;;
    *) echo ALL ;;
  esac
}
