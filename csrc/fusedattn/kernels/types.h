#pragma once
// Element and mask kinds shared by the CPU and CUDA kernels' parameter structs (torch-free).
#include <cstdint>

namespace fusedattn::kernels {

enum class DType : uint8_t { Float, Double, BFloat16, Half };
enum class MaskKind : uint8_t { None, Bool, Additive };  // Bool: 1 byte

}  // namespace fusedattn::kernels
