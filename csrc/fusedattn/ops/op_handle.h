#pragma once
// The typed dispatcher handle of a registered fusedattn op: what each ops:: wrapper calls, so
// that a C++ caller takes the dispatcher's path (autograd, autocast, backends) as Python does.
#include <ATen/core/dispatch/Dispatcher.h>

namespace fusedattn::detail {

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace fusedattn::detail
