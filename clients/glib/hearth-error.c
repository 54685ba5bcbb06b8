#include "hearth-error.h"

static const GDBusErrorEntry entries[] = {
  { HEARTH_ERROR_INVALID_ARGS, "org.hearth.Hearth1.Error.InvalidArgs" },
  { HEARTH_ERROR_CONTEXT_LENGTH_EXCEEDED, "org.hearth.Hearth1.Error.ContextLengthExceeded" },
  { HEARTH_ERROR_MODEL_NOT_FOUND, "org.hearth.Hearth1.Error.ModelNotFound" },
  { HEARTH_ERROR_MODEL_UNAVAILABLE, "org.hearth.Hearth1.Error.ModelUnavailable" },
  { HEARTH_ERROR_BUSY, "org.hearth.Hearth1.Error.Busy" },
  { HEARTH_ERROR_CANCELLED, "org.hearth.Hearth1.Error.Cancelled" },
  { HEARTH_ERROR_NOT_AUTHORIZED, "org.hearth.Hearth1.Error.NotAuthorized" },
  { HEARTH_ERROR_PRIVACY_VIOLATION, "org.hearth.Hearth1.Error.PrivacyViolation" },
  { HEARTH_ERROR_CLOUD_UNAVAILABLE, "org.hearth.Hearth1.Error.CloudUnavailable" },
  { HEARTH_ERROR_ENGINE_FAILED, "org.hearth.Hearth1.Error.EngineFailed" },
  { HEARTH_ERROR_INTERNAL, "org.hearth.Hearth1.Error.Internal" },
};

GQuark
hearth_error_quark (void)
{
  static gsize quark = 0;
  g_dbus_error_register_error_domain ("hearth-error-quark", &quark, entries, G_N_ELEMENTS (entries));
  return (GQuark) quark;
}
