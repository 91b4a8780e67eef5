-- Argo CD health of a troughfill BatchPool: its online signal and PriorityClasses.
local hs = {}
if obj.status == nil or obj.status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator's first planning cycle"
  return hs
end
local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end
for _, c in ipairs(obj.status.conditions) do
  if (c.type == "SignalReady" or c.type == "PriorityClassesReady") and c.status ~= "True" then
    hs.status = "Degraded"
    hs.message = c.type .. " (" .. tostring(c.reason) .. "): " .. tostring(c.message)
    return hs
  end
end
local s = obj.status
hs.status = "Healthy"
-- (Argo CD opens no string library: concatenation only)
hs.message = tostring(s.capacityGPUs or 0) .. " GPUs: online " .. tostring(s.onlineGPUs or 0)
  .. ", trough " .. tostring(s.troughGPUs or 0) .. ", batch " .. tostring(s.batchGPUs or 0)
  .. "; " .. tostring(s.activeJobs or 0) .. " active jobs"
return hs
