-- Argo CD health of a troughfill BatchInference: its phase and conditions as the operator wrote
-- them for the generation it last observed.
local hs = {}

local function condition(kind)
  if obj.status ~= nil and obj.status.conditions ~= nil then
    for _, c in ipairs(obj.status.conditions) do
      if c.type == kind then
        return c
      end
    end
  end
  return nil
end

local function message_of(kind, fallback)
  local c = condition(kind)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to admit the job"
  return hs
end
local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local phase = obj.status.phase
local progress = obj.status.progress or "0/0 (0%)"
if phase == "completed" then
  hs.status = "Healthy"
  hs.message = "Completed " .. progress .. ": " .. message_of("Complete", "every request has a result or an error")
  return hs
end
if phase == "failed" then
  hs.status = "Degraded"
  hs.message = "Failed: " .. message_of("Failed", "the job failed")
  return hs
end
if phase == "expired" then
  hs.status = "Degraded"
  hs.message = "Expired: " .. message_of("Expired", "the completion window ended")
  return hs
end
if phase == "cancelled" then
  hs.status = "Degraded"
  hs.message = "Cancelled: " .. message_of("Cancelled", "the job was cancelled")
  return hs
end
if phase == "cancelling" then
  hs.status = "Progressing"
  hs.message = "Cancelling " .. progress .. ": finished results are being merged"
  return hs
end

local admitted = condition("Admitted")
if admitted ~= nil and admitted.status == "False" then
  hs.status = "Degraded"
  hs.message = "Not admitted (" .. tostring(admitted.reason) .. "): " .. tostring(admitted.message)
  return hs
end
local running = condition("Running")
if running ~= nil and running.reason == "CrashLoop" then
  hs.status = "Degraded"
  hs.message = "Workers crash-looping: " .. tostring(running.message)
  return hs
end
if obj.spec ~= nil and obj.spec.suspend == true then
  hs.status = "Suspended"
  hs.message = "Suspended at " .. progress .. ": every worker stopped, progress kept"
  return hs
end
if obj.spec ~= nil and obj.spec.cancel == true then
  hs.status = "Progressing"
  hs.message = "Cancel requested at " .. progress
  return hs
end

local doing = "validating the input"
if phase == "finalizing" then
  doing = "merging the output"
elseif running ~= nil then
  if running.reason == "WorkersReady" then
    doing = "running: " .. tostring(running.message)
  elseif running.reason == "OnlineDemand" then
    doing = "yielding: online serving needs the GPUs"
  elseif running.reason == "SignalStale" then
    doing = "holding back: the online demand signal is stale"
  else
    doing = "waiting for a trough"
  end
elseif phase == "in_progress" then
  doing = "waiting for a trough"
end
local at_risk = condition("AtRisk")
if at_risk ~= nil and at_risk.status == "True" then
  doing = doing .. "; at risk: " .. tostring(at_risk.message)
end
hs.status = "Progressing"
hs.message = progress .. ", " .. doing
return hs
