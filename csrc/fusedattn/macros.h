#pragma once
// Symbol visibility: the library is built with -fvisibility=hidden; the public C++ API is marked.
#if defined(FUSEDATTN_BUILDING_LIBRARY)
#define FUSEDATTN_API __attribute__((visibility("default")))
#else
#define FUSEDATTN_API
#endif
