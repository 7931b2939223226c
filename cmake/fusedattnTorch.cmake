# Finds LibTorch and gives the target `torch` (and TORCH_LIBRARIES, TORCH_INSTALL_PREFIX).
#
# Torch's own CMake package, when torch was built with CUDA (every PyPI wheel for Linux),
# stops with an error if no CUDA toolkit is installed, even to link CPU-only code. Where no
# toolkit is found, this defines `torch` from the library files instead, which is all a CPU
# build of fusedattn needs. Used by the project and by the installed fusedattnConfig.cmake.
if(TARGET torch)
  return()
endif()
find_path(FUSEDATTN_TORCH_CONFIG_DIR TorchConfig.cmake PATH_SUFFIXES Torch share/cmake/Torch
          HINTS "${Torch_DIR}")
if(NOT FUSEDATTN_TORCH_CONFIG_DIR)
  message(FATAL_ERROR "fusedattn: LibTorch not found; pass -DCMAKE_PREFIX_PATH="
                      "$(python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')")
endif()
get_filename_component(_fa_torch_prefix "${FUSEDATTN_TORCH_CONFIG_DIR}/../../.." ABSOLUTE)
find_package(CUDAToolkit QUIET)
if(CUDAToolkit_FOUND OR NOT EXISTS "${_fa_torch_prefix}/lib/libtorch_cuda.so")
  set(Torch_DIR "${FUSEDATTN_TORCH_CONFIG_DIR}")
  find_package(Torch REQUIRED CONFIG)
else()
  message(STATUS "fusedattn: torch is a CUDA build but no CUDA toolkit was found: "
                 "linking LibTorch's CPU libraries directly")
  file(READ "${FUSEDATTN_TORCH_CONFIG_DIR}/TorchConfig.cmake" _fa_torch_config)
  set(_fa_abi 1)
  if(_fa_torch_config MATCHES "_GLIBCXX_USE_CXX11_ABI=([01])")
    set(_fa_abi ${CMAKE_MATCH_1})
  endif()
  add_library(torch INTERFACE IMPORTED)
  if(_fa_torch_config MATCHES "cxx_std_20")  # torch >= 2.13 headers need C++20
    set_property(TARGET torch PROPERTY INTERFACE_COMPILE_FEATURES cxx_std_20)
  endif()
  set_target_properties(torch PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES
      "${_fa_torch_prefix}/include;${_fa_torch_prefix}/include/torch/csrc/api/include"
    INTERFACE_LINK_LIBRARIES
      "${_fa_torch_prefix}/lib/libtorch.so;${_fa_torch_prefix}/lib/libtorch_cpu.so;${_fa_torch_prefix}/lib/libc10.so"
    INTERFACE_COMPILE_OPTIONS "-D_GLIBCXX_USE_CXX11_ABI=${_fa_abi}")
  set(TORCH_LIBRARIES torch)
  set(TORCH_INSTALL_PREFIX "${_fa_torch_prefix}")
  set(Torch_FOUND TRUE)
endif()
